"""Decoupled merging by row blocks (the Gram path): task arithmetic.

Conventions as in `peft_orthomerge.ops.decouple`: torch layout, ``W`` is ``(out, in)``; a rotation ``P`` (``in x in``)
acts on the input side, ``W0 @ P``. `decouple_merge` sends it ``residual="ta"`` on weights with
``out >= in`` (square and tall matrices: q/o projections, gate/up, embeddings, ``lm_head``; see
`paths`); called directly it accepts any 2-D weight.

Task arithmetic is linear, so the merged weight needs no per-task residual::

    out = W0 @ R + sum_i c_i (W_i - W0 @ P_i)
        = W0 + sum_i c_i tau_i + W0 @ X,        X = (R - I) - sum_i c_i (P_i - I)

with ``tau_i = W_i - W0``, ``c_i = lam * N * w_i`` (the ``"ta"`` method's coefficients) and ``R``
the merged rotation. Every ``(out, in)``-sized quantity is touched one block of rows at a time,
in two passes; all per-task work is on ``in x in`` matrices:

1. First pass, by row blocks: ``G = W0^T W0``, ``E_i = W0^T tau_i`` and ``||tau_i||_F``; the
   Procrustes matrix is ``M_i = W0^T T_i = G + E_i`` for the global target. The conflict target
   ``T_i = W0 + tau_i * mask_i`` is row-local too (the cosine of a row of ``tau_i`` with the same
   row of the weighted mean task vector), so ``M_i = G + W0^T (tau_i * mask_i)`` is accumulated
   in the same pass.
2. Per task: the closest-to-identity polar factor ``P_i`` of ``M_i`` in SO(in) (`closest_polar`), ``Q_i = (P_i - I)(P_i + I)^-1``, the skew sum and ``sum_i c_i (P_i - I)``.
   Statistics without ``(out, in)`` products (``D_i = P_i - I``):
   ``||W0 D_i||_F^2 = <G D_i, D_i>`` and ``||rho_i||_F^2 = ||tau_i||^2 - 2 <E_i, D_i> + ||W0 D_i||^2``
   (the last is a difference: a residual far below ``||tau_i||`` is known to about
   ``1e-8 ||tau_i||`` in float64).
3. Merge in so(in) with magnitude correction (`stats.magnitude_factor`), ``R - I = 2 (I - Q)^-1 Q`` (one solve),
   then a second pass over row blocks writes ``W0 + sum_i c_i tau_i + W0 @ X``.

Versus forming each ``rho_i`` this saves one ``(out, in) x (in, in)`` product per task and keeps
memory at the ``in x in`` matrices (``G``, one ``E_i`` per task) plus a few row blocks, whatever
``out`` is: a 128k-row embedding costs no more memory than its blocks. Inputs are tensors or any
`RowSource` (``shape`` and ``rows(start, stop)``), e.g. a reader over a safetensors file.

`residual_rows.decouple_merge_rows` serves the other residual methods with the same passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ...errors import ConfigError, IncompatibleInputsError, NumericalError
from ..cayley import inverse_cayley_lu
from ..closest_polar import closest_polar, rank_rtol
from ..euclidean import ta_coefficients
from ..finite import all_finite
from ..procrustes import PolarResult, check_solver, demoted, resolve_solver
from ..row_tasks import row_numel
from .stats import DecoupleStats, magnitude_factor
from .targets import conflict_rows

BLOCK_BYTES = 16 * 1024**2  # row blocks of about this many bytes per (out, in)-sized temporary


@runtime_checkable
class RowSource(Protocol):
    """A 2-D weight read one block of rows at a time (in its storage dtype, on any device)."""

    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


class TensorRows:
    """`RowSource` over an in-memory tensor (row slices are views)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


def _as_row_source(x: torch.Tensor | RowSource) -> RowSource:
    return TensorRows(x) if isinstance(x, torch.Tensor) else x


def block_rows(n_in: int, element_bytes: int, block_bytes: int | None) -> int:
    """Rows per block: ``block_bytes`` (default `BLOCK_BYTES`) of ``n_in`` elements each, at least one."""
    budget = BLOCK_BYTES if block_bytes is None else block_bytes
    return max(1, budget // max(1, n_in * element_bytes))


def _combine_rows(
    base: RowSource,
    sources: Sequence[RowSource],
    coeffs: Sequence[float],
    x: torch.Tensor | None,
    load,
    step: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, float]:
    """``W0 + sum_i c_i (W_i - W0) [+ W0 @ X]`` by blocks of ``step`` rows, in ``out_dtype``; also
    ``||out - W0||_F`` before the cast."""
    block0 = load(base, 0, min(step, base.shape[0]))
    out = torch.empty(base.shape, dtype=out_dtype, device=block0.device)
    delta_sq = 0.0
    for start in range(0, base.shape[0], step):
        stop = min(base.shape[0], start + step)
        b0 = block0 if start == 0 else load(base, start, stop)
        delta = b0 @ x if x is not None else torch.zeros_like(b0)
        for c, src in zip(coeffs, sources):
            delta.add_(load(src, start, stop).sub_(b0), alpha=c)
        delta_sq += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        out[start:stop] = delta.add_(b0)
        del delta, b0
        block0 = None
    return out, delta_sq**0.5


def task_arithmetic_rows(
    w0: torch.Tensor | RowSource,
    experts: Sequence[torch.Tensor | RowSource],
    weights: Sequence[float],
    residual_kwargs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Plain task arithmetic ``W0 + sum_i c_i (W_i - W0)`` of a tensor of any shape, by blocks along
    dim 0 (no rotation: ``target=None``, norms, biases; at least 1-D). Returns the merged tensor in ``out_dtype``
    (default ``dtype``) and ``||out - W0||_F`` before that cast."""
    base = _as_row_source(w0)
    sources = [_as_row_source(e) for e in experts]
    check_row_shapes(base, sources, name)
    coeffs = ta_coefficients(weights, **dict(residual_kwargs or {}))
    device = torch.device(device if device is not None else (w0.device if isinstance(w0, torch.Tensor) else "cpu"))
    if not base.shape:
        raise ConfigError("task_arithmetic_rows needs a tensor of at least one dimension", tensor=name)
    step = block_rows(row_numel(base.shape), torch.finfo(dtype).bits // 8, block_bytes)
    return _combine_rows(base, sources, coeffs, None, row_loader(device, dtype, name), step, out_dtype or dtype)


def check_row_shapes(base: RowSource, sources: list[RowSource], name: str | None) -> None:
    for src in sources:
        if tuple(src.shape) != tuple(base.shape):
            raise IncompatibleInputsError(
                f"shape mismatch: base {tuple(base.shape)} vs expert {tuple(src.shape)}", tensor=name
            )


def row_loader(device: torch.device, dtype: torch.dtype, name: str | None):
    """``load(src, start, stop)``: rows of ``src`` in ``dtype`` on ``device``, NaN/Inf refused."""

    def load(src: RowSource, start: int, stop: int) -> torch.Tensor:
        block = src.rows(start, stop)
        if not all_finite(block):  # in the storage dtype: half the bytes of a float64 copy
            raise NumericalError("base or expert weight contains NaN or Inf", tensor=name)
        return block.to(device=device, dtype=dtype, copy=True)  # ours: in-place ops are safe

    return load


def _polar_solver(solver: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """`procrustes.resolve_solver` for a weight of torch shape ``(out, in)``: ``"eigh"`` only where
    ``M = W0^T T_i`` can have full rank (``out >= in``; else the SVD's rank rule answers)."""
    solver = resolve_solver(solver, device, dtype)
    return "svd" if solver == "eigh" and shape[0] < shape[1] else solver


def check_rows_inputs(
    base: RowSource, sources: list[RowSource], weights: Sequence[float], target: str, solver: str, name: str | None
) -> None:
    if target not in ("global", "conflict"):
        raise ConfigError(f"the row-block path needs target 'global' or 'conflict', got {target!r}")
    check_solver(solver)
    if len(sources) != len(weights) or not sources:
        raise ConfigError(f"got {len(weights)} weights for {len(sources)} experts")
    for src in sources:
        if len(base.shape) != 2 or tuple(src.shape) != tuple(base.shape):
            raise IncompatibleInputsError(
                f"shape mismatch: base {tuple(base.shape)} vs expert {tuple(src.shape)}; decoupling needs equal 2-D shapes",
                tensor=name,
            )


def _gram_pass(
    base: RowSource,
    sources: list[RowSource],
    weights: list[float],
    conflict: bool,
    load,
    step: int,
    dtype: torch.dtype,
    device: torch.device,
    stats: DecoupleStats,
) -> tuple[torch.Tensor, list, list | None, list[float]]:
    """First pass, by row blocks: ``G = W0^T W0``, ``E_i = W0^T tau_i``, for the conflict target
    ``W0^T (tau_i * mask_i)``, and ``||tau_i||^2``; records the norms (and rows kept) in ``stats``.
    Returns ``(G, [E_i], [masked E_i] or None, [||tau_i||^2])``."""
    n_out, n_in = base.shape
    gram = torch.zeros(n_in, n_in, dtype=dtype, device=device)
    cross = [torch.zeros_like(gram) for _ in sources]  # E_i = W0^T tau_i
    masked = [torch.zeros_like(gram) for _ in sources] if conflict else None
    tau_sq = [0.0] * len(sources)
    kept = [0] * len(sources)
    for start in range(0, n_out, step):
        stop = min(n_out, start + step)
        b0 = load(base, start, stop)
        gram.addmm_(b0.T, b0)
        taus = []
        for i, src in enumerate(sources):
            tau = load(src, start, stop).sub_(b0)
            tau_sq[i] += float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
            cross[i].addmm_(b0.T, tau)
            if masked is None:
                del tau
            else:
                taus.append(tau)
        if masked is not None:
            mean = sum(w * t for w, t in zip(weights, taus))
            for i, tau in enumerate(taus):
                keep = conflict_rows(tau, mean)
                kept[i] += int(keep.sum())
                masked[i].addmm_(b0.T, tau * keep[:, None])
            del taus, mean
    stats.task_vector_norms = [v**0.5 for v in tau_sq]
    if masked is not None:
        stats.rows_kept = kept
    return gram, cross, masked, tau_sq


def _task_rotations(
    gram: torch.Tensor,
    cross: list,
    masked: list | None,
    tau_sq: list[float],
    weights: list[float],
    coeffs: list[float],
    solver: str,
    rtol: float,
    name: str | None,
    stats: DecoupleStats,
    kept: list | None = None,
) -> tuple[torch.Tensor | None, float, torch.Tensor]:
    """Per task: ``P_i``, ``Q_i``, the statistics; returns ``(sum_i w_i Q_i or None,
    sum_i w_i ||Q_i||_F, sum_i c_i (P_i - I))``. Frees ``cross[i]`` / ``masked[i]`` as it goes.
    With ``kept`` (a list), ``D_i = P_i - I`` (``None`` for ``P_i = I``) is appended to it per task.
    After one task falls back to the SVD the others go to it directly (`procrustes.demoted`)."""
    skew_sum: torch.Tensor | None = None
    total = 0.0
    d_sum = torch.zeros_like(gram)
    infos: list[PolarResult] = []
    requested = solver
    count = len(cross)
    stats.skew_norms = [0.0] * count
    stats.orth_part_norms = [0.0] * count
    stats.residual_norms = list(stats.task_vector_norms)
    for i in range(count):
        part = cross[i] if masked is None else masked[i]
        if not bool(part.any()):  # T_i = W0 on W0's column space: P_i = I, Q_i = 0, rho_i = tau_i
            if kept is not None:
                kept.append(None)
            continue
        m = gram + part
        del part
        if masked is not None:
            masked[i] = None
        p, info = closest_polar(m, solver, rtol)
        del m
        if solver != requested:  # demoted: answered by the SVD instead of the requested solver
            info.solver, info.fallback = requested, 1
        solver = demoted(solver, info)
        infos.append(info)
        q = inverse_cayley_lu(p, name=name)
        norm = float(torch.linalg.matrix_norm(q))
        stats.skew_norms[i] = norm
        total += weights[i] * norm
        skew_sum = weights[i] * q if skew_sum is None else skew_sum.add_(q, alpha=weights[i])
        del q
        p.diagonal().sub_(1)
        d = p  # D_i = P_i - I, in place
        d_sum.add_(d, alpha=coeffs[i])
        if kept is not None:
            kept.append(d)
        orth_sq = float(torch.vdot((gram @ d).flatten(), d.flatten()))
        res_sq = tau_sq[i] - 2 * float(torch.vdot(cross[i].flatten(), d.flatten())) + orth_sq
        stats.orth_part_norms[i] = max(orth_sq, 0.0) ** 0.5
        stats.residual_norms[i] = max(res_sq, 0.0) ** 0.5
        del d, p
        cross[i] = None
    stats.record_solver(infos)
    return skew_sum, total, d_sum


def _merged_correction(
    d_sum: torch.Tensor, skew_sum: torch.Tensor | None, total: float, stats: DecoupleStats
) -> torch.Tensor:
    """``X = (R - I) - sum_i c_i (P_i - I)`` with ``R = cayley(c S)``, ``R - I = 2 (I - Q)^-1 Q``
    (one solve); overwrites ``d_sum`` and ``skew_sum``."""
    factor = magnitude_factor(skew_sum, total)
    stats.magnitude_factor = factor
    x = d_sum.neg_()
    if factor is not None:
        stats.merged_skew_norm = total
        q = skew_sum.mul_(factor)
        eye_minus_q = q.neg()
        eye_minus_q.diagonal().add_(1)
        x.add_(torch.linalg.solve(eye_minus_q, q.mul_(2)))  # R - I = 2 (I - Q)^-1 Q
        del q, eye_minus_q
    return x


def row_sources(
    w0: torch.Tensor | RowSource, experts: Sequence[torch.Tensor | RowSource], device: torch.device | str | None
) -> tuple[RowSource, list[RowSource], torch.device]:
    """The base and the experts as `RowSource`s, and the device the math runs on (default: ``w0``'s
    device for a tensor, else the CPU)."""
    if device is None:
        device = w0.device if isinstance(w0, torch.Tensor) else torch.device("cpu")
    return _as_row_source(w0), [_as_row_source(e) for e in experts], torch.device(device)


def rows_correction(
    base: RowSource,
    sources: list[RowSource],
    weights: list[float],
    coeffs: list[float],
    target: str,
    solver: str,
    rtol: float,
    name: str | None,
    load,
    step: int,
    dtype: torch.dtype,
    device: torch.device,
    stats: DecoupleStats,
    kept: list | None = None,
) -> torch.Tensor:
    """Both passes' shared middle: the Gram pass (`_gram_pass`), the per-task rotations
    (`_task_rotations`, ``D_i`` appended to ``kept`` when given) and the merged correction
    ``X = (R - I) - sum_i c_i (P_i - I)`` (`_merged_correction`), which it returns."""
    solver = _polar_solver(solver, device, dtype, base.shape)
    gram, cross, masked, tau_sq = _gram_pass(
        base, sources, weights, target == "conflict", load, step, dtype, device, stats
    )
    skew_sum, total, d_sum = _task_rotations(
        gram, cross, masked, tau_sq, weights, coeffs, solver, rtol, name, stats, kept
    )
    del cross, gram, masked
    return _merged_correction(d_sum, skew_sum, total, stats)


def decouple_merge_ta_rows(
    w0: torch.Tensor | RowSource,
    experts: Sequence[torch.Tensor | RowSource],
    weights: Sequence[float],
    target: str = "global",
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, DecoupleStats]:
    """``decouple_merge(w0, experts, weights, target, "ta", residual_kwargs, solver)`` by row blocks.

    ``weights`` are normalised (sum 1); ``target`` is ``"global"`` or ``"conflict"``. Math runs in
    ``dtype`` on ``device`` (default: ``w0``'s device, else the CPU); the merged weight comes back
    in ``out_dtype`` (default ``dtype``) and ``stats.merged_delta_norm`` is ``||out - W0||_F``
    before that cast. See the module docstring for the formulas.
    """
    base, sources, device = row_sources(w0, experts, device)
    check_rows_inputs(base, sources, weights, target, solver, name)
    rtol = rank_rtol(dtype) if rtol is None else rtol
    out_dtype = dtype if out_dtype is None else out_dtype
    weights = [float(w) for w in weights]
    coeffs = ta_coefficients(weights, **dict(residual_kwargs or {}))
    # the conflict target holds every task vector of a block at once: smaller blocks
    share = len(sources) if target == "conflict" else 1
    step = max(1, block_rows(base.shape[1], torch.finfo(dtype).bits // 8, block_bytes) // share)
    load = row_loader(device, dtype, name)
    stats = DecoupleStats()
    x = rows_correction(base, sources, weights, coeffs, target, solver, rtol, name, load, step, dtype, device, stats)
    # second pass: out = W0 + sum_i c_i tau_i + W0 @ X
    out, stats.merged_delta_norm = _combine_rows(base, sources, coeffs, x, load, step, out_dtype)
    return out, stats
