"""Decoupled merging by row blocks for the residual methods with a row-block form (`streamed_rows`:
TIES, DARE, TSV-M, Fisher-Rao).

Conventions and the first passes as in `rows` (torch layout, ``W`` is ``(out, in)``, ``P`` acts on
the input side, ``W0 @ P``): steps 1-3 there keep ``D_i = P_i - I`` per task (``in x in``), the
method makes its passes over ``rho_i = tau_i - W0 @ D_i`` recomputed block by block from the
sources, and a last pass writes ``W0 + W0 @ (R - I) + merged(rho)``; with ``target=None``
(``P_i = I``) it merges ``tau_i`` of a tensor of any shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import ConfigError
from ..closest_polar import rank_rtol
from ..row_tasks import row_blocks, row_numel
from ..streamed_rows import row_method
from .rows import (
    RowSource,
    block_rows,
    check_row_shapes,
    check_rows_inputs,
    row_loader,
    row_sources,
    rows_correction,
)
from .stats import DecoupleStats


class _ResidualRows:
    """`row_tasks.RowTasks` of ``rho_i = W_i - W0 @ P_i = tau_i - W0 @ D_i`` (``D_i = P_i - I``;
    ``None``: ``rho_i = tau_i``) by blocks of ``step`` rows read from the sources; the last base
    block is kept, since every task asks for the same block in turn."""

    def __init__(self, base: RowSource, sources: list[RowSource], rotations: list, load, step: int) -> None:
        self.base, self.sources, self.rotations, self.load = base, sources, rotations, load
        self.shape, self.count, self.step = tuple(base.shape), len(sources), step
        self.cached: tuple[int, int, torch.Tensor] | None = None

    def base_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.cached is None or self.cached[:2] != (start, stop):
            self.cached = (start, stop, self.load(self.base, start, stop))
        return self.cached[2]

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        b0 = self.base_rows(start, stop)
        rho = self.load(self.sources[i], start, stop).sub_(b0)
        if self.rotations[i] is not None:
            rho.sub_(b0 @ self.rotations[i])
        return rho


def decouple_merge_rows(
    w0: torch.Tensor | RowSource,
    experts: Sequence[torch.Tensor | RowSource],
    weights: Sequence[float],
    target: str | None,
    residual: str,
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    *,
    generator: torch.Generator | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, DecoupleStats]:
    """``decouple_merge`` with a residual method that has a row-block form (`streamed_rows`), by row blocks.

    ``target`` ``"global"`` / ``"conflict"`` (a 2-D weight; the rotations ``P_i`` from the Gram pass
    as for task arithmetic, the merged ``R`` by magnitude-corrected so(in) merging) or ``None`` (a
    tensor of any shape of at least one dimension, ``P_i = I``). The residual rows
    ``rho_i = W_i - W0 @ P_i`` are recomputed from the sources on every pass of the method; the
    result ``W0 @ R + merged(rho)`` is written block by block in ``out_dtype`` (default ``dtype``),
    and ``stats.merged_delta_norm`` is ``||out - W0||_F`` before that cast. Memory: ``in x in``
    matrices (``G``, one ``E_i`` and one ``D_i`` per task), a few row blocks per task and the output.
    """
    method = row_method(residual)
    if method is None:
        raise ConfigError(f"residual method {residual!r} has no row-block form")
    base, sources, device = row_sources(w0, experts, device)
    weights = [float(w) for w in weights]
    step = max(1, block_rows(row_numel(base.shape), torch.finfo(dtype).bits // 8, block_bytes) // len(sources))
    load = row_loader(device, dtype, name)
    stats = DecoupleStats(solver="none")
    x = None
    rotations: list = [None] * len(sources)
    if target is None:
        check_row_shapes(base, sources, name)
        if len(sources) != len(weights) or not sources or not base.shape:
            raise ConfigError(f"got {len(weights)} weights for {len(sources)} experts of shape {base.shape}")
    else:
        check_rows_inputs(base, sources, weights, target, solver, name)
        rtol = rank_rtol(dtype) if rtol is None else rtol
        stats = DecoupleStats()
        rotations = []
        zeros = [0.0] * len(sources)  # R - I alone: the residual method merges the rest
        x = rows_correction(
            base, sources, weights, zeros, target, solver, rtol, name, load, step, dtype, device, stats, rotations
        )
    tasks = _ResidualRows(base, sources, rotations, load, step)
    merged = method(tasks, weights, generator=generator, dtype=dtype, **dict(residual_kwargs or {}))
    out: torch.Tensor | None = None
    delta_sq = 0.0
    for start, stop in row_blocks(base.shape[0], step):
        b0 = tasks.base_rows(start, stop)
        delta = merged(start, stop)
        if x is not None:
            delta.add_(b0 @ x)
        delta_sq += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        if out is None:
            out = torch.empty(base.shape, dtype=out_dtype or dtype, device=device)
        out[start:stop] = delta.add_(b0)
        del delta, b0
    stats.merged_delta_norm = delta_sq**0.5
    return out, stats
