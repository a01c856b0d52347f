"""Statistics of a merged OFT module: norms, magnitude factor, and the orthogonality error of the
rotation PEFT will build from the stored vector.

The orthogonality error in each module's `ModuleStats` is ``max_k ||R_k^T R_k - I||_F`` of the
rotation blocks PEFT builds under the output flag from the merged float32 vector (the stored one),
computed in float32 as PEFT's float32 forward does (float64 where float32 overflows), over the
``orthogonality_blocks`` blocks of largest ``||Q_k||_F`` (default 4; ``None``: every block).
What it measures: with the exact Cayley flag, float32 rounding only (~1e-6); with the Neumann flag,
the series' truncation error (plus that rounding), a function of each block's rotation angles that
grows with them over the series' useful range (for the default 5 terms: angles below 1 rad), and
``||Q_k||_F`` bounds those angles, so the blocks of largest norm are the ones that show it (a
measurement on those blocks, not a proven maximum over the others).
``report.params["orthogonality_blocks"]`` records the setting. Non-orthogonal methods
(``mean_r``): every block of the mean rotation, in float64.
"""

from __future__ import annotations

import math

import torch

from ..ops.orthogonality import max_orthogonality_error, orthogonality_errors
from ..ops.skew import peft_rotation, vec_to_skew
from ..ops.so_merge import ModuleMerge
from ..plan.oft import ModulePlan, OftPlan
from ..report import MergeReport, ModuleStats


def module_stats(mp: ModulePlan, merge: ModuleMerge) -> ModuleStats:
    """Per-module statistics; the orthogonality error is filled in by `OrthogonalityProbe`."""
    return ModuleStats(
        name=mp.name,
        input_norms=merge.input_norms,
        merged_norm=merge.merged_norm,
        magnitude_factor=merge.magnitude_factor,
        extra=merge.extra,
    )


class OrthogonalityProbe:
    """Fills in `ModuleStats.orthogonality_error` (see the module docstring) in batches: per module it
    keeps the float32 merged vectors of the ``plan.orthogonality_blocks`` blocks of largest norm, and
    builds their rotations together, a few thousand blocks at a time, in float32 (as PEFT's float32
    forward does); blocks where float32 overflows are redone in float64. A statistic that is still
    not finite is left ``None``, with a warning in the report."""

    FLUSH_BLOCKS = 4096

    def __init__(self, plan: OftPlan, report: MergeReport) -> None:
        self.plan = plan
        self.report = report
        self.pending: dict[int, list[tuple[ModuleStats, torch.Tensor]]] = {}
        self.count = 0

    def add(self, stats: ModuleStats, mp: ModulePlan, merge: ModuleMerge) -> ModuleStats:
        if merge.vec is None:  # non-orthogonal method: the rotation itself, every block
            self._set(stats, max_orthogonality_error(merge.rotation))
            return stats
        vec = merge.vec
        k = self.plan.options.orthogonality_blocks
        if k is not None and vec.shape[0] > k:
            vec = vec[torch.topk(merge.block_norms.to(vec.device), k).indices]
        self.pending.setdefault(mp.b, []).append((stats, vec.to(device="cpu", dtype=torch.float32)))
        self.count += vec.shape[0]
        if self.count >= self.FLUSH_BLOCKS:
            self.finish()
        return stats

    def _errors(self, vecs: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
        rotation = peft_rotation(
            vec_to_skew(vecs, b, dtype=dtype), self.plan.use_cayley_neumann, self.plan.terms, dtype=dtype
        )
        return orthogonality_errors(rotation)

    def _set(self, stats: ModuleStats, value: float) -> None:
        if math.isfinite(value):
            stats.orthogonality_error = value
        else:
            self.report.warnings.append(
                f"{stats.name}: the orthogonality error of the merged rotation is not finite (far outside the "
                "Neumann series' range); not reported"
            )

    def finish(self) -> None:
        for b, items in self.pending.items():
            vecs = torch.cat([v for _, v in items])
            errors = self._errors(vecs, b, torch.float32).double()
            bad = ~torch.isfinite(errors)
            if bool(bad.any()):
                errors[bad] = self._errors(vecs[bad], b, torch.float64)
            values, start = errors.tolist(), 0
            for stats, v in items:
                self._set(stats, max(values[start : start + v.shape[0]]))
                start += v.shape[0]
        self.pending, self.count = {}, 0
