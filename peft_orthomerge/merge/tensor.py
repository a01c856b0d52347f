"""Merging one tensor of a decoupled merge, in memory or straight from checkpoint files.

`merge_tensor` (whole tensors) and `merge_rows` (blocks of rows) do the math for any source.
Layout: a 2-D weight is in torch layout ``(out, in)`` and each expert is decoupled as
``W_i ~ W0 @ P_i`` (the rotation acts on the input side; GPT-2 ``Conv1D`` weights arrive here
already transposed). Every other floating tensor is merged by the Euclidean residual method on
its task vectors ``W_i - W0``. The result is the merged full tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from ..device import to_output
from ..errors import NumericalError, names_tensor
from ..ops.decouple import (
    BlockRotation,
    DecoupleStats,
    RowSource,
    decouple_merge,
    decouple_merge_rows,
    decouple_merge_ta_rows,
    task_arithmetic_rows,
)
from ..ops.finite import all_finite
from ..ops.precision import base_condition, decoupling_dtype, rows_condition
from ..ops.registry import get_euclidean, merge_iter
from ..ops.streamed import FreshTasks, streamed_method
from ..plan.options import DecoupleOptions
from ..report import ModuleStats


def finite_output(tensor: torch.Tensor, name: str, path: Any = None) -> torch.Tensor:
    """``tensor``, or `NumericalError` naming it when a merged value is not finite."""
    if not all_finite(tensor):
        raise NumericalError("merged tensor is not finite (overflow in the output dtype?)", path=path, tensor=name)
    return tensor


def decoupled_stats(name: str, stats: DecoupleStats, merged_delta_norm: float) -> ModuleStats:
    """A report entry for a decoupled tensor: input and merged skew norms, magnitude factor, solver error."""
    extra = stats.as_extra()
    extra["merged_delta_norm"] = merged_delta_norm
    return ModuleStats(
        name=name,
        input_norms=list(stats.skew_norms) if stats.skew_norms else list(stats.task_vector_norms),
        merged_norm=stats.merged_skew_norm if stats.skew_norms else merged_delta_norm,
        magnitude_factor=stats.magnitude_factor,
        orthogonality_error=stats.solver_error if stats.skew_norms else None,
        extra=extra,
    )


@names_tensor
def merge_tensor(
    name: str,
    w0: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    options: DecoupleOptions,
    *,
    decoupled: bool,
    device: torch.device,
    given: Sequence[BlockRotation | None] | None = None,
) -> tuple[torch.Tensor, DecoupleStats]:
    """Merge one tensor on ``device`` in the options' precision (except that a decoupled weight is
    computed in float64 where float32 is not accurate enough for it, `ops.precision`); returns the
    merged full tensor (in that dtype) and statistics. ``given``: per expert, the rotation it
    brings for this weight (an OFT adapter's, `ops.decouple.BlockRotation`) or ``None``; used on
    the decoupled path only (`ops.decouple.decouple_merge`).

    ``w0`` and ``experts`` stay in their storage dtype until used: each expert is converted when
    its turn comes. Off the decoupled path a linear residual method (`registry.merge_iter`)
    accumulates the task vectors one at a time, so only the base, the accumulator and one task
    vector are alive in the compute dtype; a method with a streamed form (`ops.streamed`) makes
    several passes over ``experts`` (each expert converted again, one at a time).
    """
    two_d = decoupled and w0.dim() == 2  # else decouple_merge refuses it with its own error
    dtype, estimate = decoupling_dtype(options.dtype, partial(base_condition, w0) if two_d else None)
    gen = options.generator(name, device)
    rkw = options.method_kwargs
    if decoupled:
        merged, stats = decouple_merge(
            w0.to(device=device),
            experts,
            weights,
            options.target,
            options.residual,
            rkw,
            options.solver,
            generator=gen,
            name=name,
            dtype=dtype,
            given=given,
        )
        stats.float32_estimate = estimate
        return merged, stats
    base = w0.to(device=device, dtype=dtype)
    stats = DecoupleStats(solver="none")

    def task_vectors():
        record = not stats.task_vector_norms  # the first pass only
        for expert in experts:
            tau = expert.to(device=device, dtype=dtype, copy=True).sub_(base)  # one new tensor per expert
            if record:
                stats.task_vector_norms.append(float(torch.linalg.vector_norm(tau)))
            yield tau
            del tau

    streamed = streamed_method(options.residual)
    if streamed is not None:  # several passes over the experts (re-read), one task vector at a time
        merged = streamed(FreshTasks(task_vectors), list(weights), base=base, generator=gen, **rkw)
    else:
        fn = get_euclidean(options.residual)
        merged = merge_iter(fn, task_vectors(), list(weights), base=base, generator=gen, **rkw)
    return merged.to(dtype).add_(base), stats


@names_tensor
def merge_rows(
    name: str,
    base: RowSource,
    experts: Sequence[RowSource],
    weights: Sequence[float],
    options: DecoupleOptions,
    *,
    decoupled: bool,
    storage: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, ModuleStats | None]:
    """Task arithmetic, or a residual method with a row-block form (`ops.streamed_rows`), on one
    tensor read by blocks of rows (``base`` and ``experts`` give ``rows(start, stop)``): only
    ``in x in`` matrices and a few row blocks per expert are alive besides the output, which is in
    the ``storage`` dtype. Returns it and, when decoupled, its report entry. A decoupled weight is
    computed in float64 where float32 is not accurate enough (`ops.precision`)."""
    rkw = options.method_kwargs
    dtype, estimate = decoupling_dtype(options.dtype, partial(rows_condition, base) if decoupled else None)
    if options.residual != "ta":
        out, stats = decouple_merge_rows(
            base,
            experts,
            weights,
            options.target if decoupled else None,
            options.residual,
            rkw,
            options.solver,
            generator=options.generator(name, device),
            name=name,
            dtype=dtype,
            out_dtype=storage,
            device=device,
        )
    elif not decoupled:
        out, _ = task_arithmetic_rows(
            base, experts, weights, rkw, name=name, dtype=dtype, out_dtype=storage, device=device
        )
    else:
        out, stats = decouple_merge_ta_rows(
            base,
            experts,
            weights,
            options.target,
            rkw,
            options.solver,
            name=name,
            dtype=dtype,
            out_dtype=storage,
            device=device,
        )
    if not decoupled:
        return to_output(out, storage), None
    stats.float32_estimate = estimate
    return to_output(out, storage), decoupled_stats(name, stats, stats.merged_delta_norm)
