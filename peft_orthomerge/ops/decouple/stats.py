"""Report numbers of a decoupled merge (`DecoupleStats`) and the so(in) merge of its rotations (`SkewSum`).

Conventions: torch layout, ``W`` is ``(out, in)``, rotations act on the input side (``W0 @ P_i``);
``Q_i = (P_i - I)(P_i + I)^-1`` (canonical, `cayley`). The merged generator is
``Q = c S`` with ``S = sum_i w_i Q_i`` and the magnitude factor ``c = (sum_i w_i ||Q_i||_F) / ||S||_F``
(DESIGN section 3; ``S = 0`` gives no rotation, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..frame import Frame, Rotation
from ..procrustes import PolarResult
from ..so_merge import ZERO_RTOL


@dataclass
class DecoupleStats:
    """Numbers for the report: per expert and for the merged result."""

    task_vector_norms: list[float] = field(default_factory=list)
    orth_part_norms: list[float] = field(default_factory=list)  # ||W0 @ P_i - W0||_F
    residual_norms: list[float] = field(default_factory=list)  # ||rho_i||_F
    skew_norms: list[float] = field(default_factory=list)  # ||Q_i||_F
    merged_skew_norm: float = 0.0
    magnitude_factor: float | None = None
    solver: str = ""
    solver_error: float = 0.0
    solver_fallback: int = 0
    rows_kept: list[int] = field(default_factory=list)  # conflict target only
    merged_delta_norm: float | None = None  # ||out - W0||_F, set by the row-block path (`decouple.rows`)
    float32_estimate: float | None = None  # under precision="float32": `ops.precision.float32_error_estimate`

    def as_extra(self) -> dict[str, float]:
        out: dict[str, float] = {"solver_error": self.solver_error, "solver_fallback": float(self.solver_fallback)}
        if self.float32_estimate is not None:  # computed in float32 only where it is at most FLOAT32_TOL
            out["float32_error_estimate"] = self.float32_estimate
        names = {
            "task_vector_norms": "task_vector_norm",
            "orth_part_norms": "orth_part_norm",
            "residual_norms": "residual_norm",
            "rows_kept": "rows_kept",
        }
        for key, label in names.items():
            for i, v in enumerate(getattr(self, key)):
                out[f"{label}_{i}"] = float(v)
        return out

    def record_solver(self, infos: list[PolarResult]) -> None:
        """Solver name, worst orthogonality error and total fallbacks over the tasks' polar solves
        (``"identity"`` when no task needed a rotation)."""
        if infos:
            self.solver = infos[0].solver
            self.solver_error = max(x.orthogonality_error for x in infos)
            self.solver_fallback = sum(x.fallback for x in infos)
        else:
            self.solver = "identity"


@dataclass
class SkewSum:
    """``S = sum_i w_i Q_i`` and ``sum_i w_i ||Q_i||_F``, one rotation at a time. With a shared
    frame (reduced basis) ``S`` is kept in frame coordinates, so no task costs an ``in x in``
    product; ``base_coords`` ``A`` then gives ``W0 @ F = [A, 0]``. With ``dense`` (some expert
    brings its own generator, `add_generator`) ``S`` is always kept in standard coordinates."""

    skew: torch.Tensor | None = None
    frame: Frame | None = None
    base_coords: torch.Tensor | None = None
    total: float = 0.0
    infos: list[PolarResult] = field(default_factory=list)
    dense: bool = False

    def add(self, rot: Rotation, info: PolarResult, weight: float, base: torch.Tensor, name: str | None) -> float:
        """Adds ``weight * Q`` of ``rot``; returns ``||Q||_F``."""
        self.infos.append(info)
        qc = rot.skew_core(name)
        norm = float(torch.linalg.matrix_norm(qc))  # = ||Q_i||_F: B has orthonormal columns
        self.total += weight * norm
        if rot.frame is not None and self.dense:
            basis = rot.basis
            self._add_dense(basis @ qc @ basis.T, weight)
        elif rot.frame is not None:
            if self.skew is None:
                self.frame, self.base_coords = rot.frame, rot.base_coords
                self.skew = base.new_zeros(base.shape[1], base.shape[1])
            rot.add_skew_in_frame(self.skew, qc, weight)
        else:
            self._add_dense(qc, weight)
        return norm

    def add_generator(self, q: torch.Tensor, weight: float) -> float:
        """Adds ``weight * q`` for a generator ``q`` given densely (``in x in`` skew, needs ``dense``); returns ``||q||_F``."""
        norm = float(torch.linalg.matrix_norm(q))
        self.total += weight * norm
        self._add_dense(q, weight)
        return norm

    def _add_dense(self, q: torch.Tensor, weight: float) -> None:
        if self.skew is None:
            self.skew = weight * q
        else:
            self.skew.add_(q, alpha=weight)


def magnitude_factor(skew_sum: torch.Tensor | None, total: float) -> float | None:
    """``c = (sum_i w_i ||Q_i||) / ||S||`` for ``S = sum_i w_i Q_i``; ``None`` when ``S = 0`` (no rotation)."""
    if skew_sum is None or total == 0.0:
        return None
    s_norm = float(torch.linalg.matrix_norm(skew_sum))
    return None if s_norm <= ZERO_RTOL * total else total / s_norm


def merged_stats(stats: DecoupleStats, skew: SkewSum) -> float | None:
    """Fills the solver and merged-rotation fields of ``stats``; returns the magnitude factor ``c``
    (``None``: no rotation)."""
    stats.record_solver(skew.infos)
    c = magnitude_factor(skew.skew, skew.total)
    stats.magnitude_factor = c
    if c is not None:
        stats.merged_skew_norm = skew.total  # the merged Q = c S has ||Q||_F = sum_i w_i ||Q_i||_F by construction
    return c


def diff_norm(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> float:
    """``||a - b||_F`` of two ``(out, in)`` matrices, by blocks of rows (no full-size temporary)."""
    squares = sum(
        float(torch.linalg.vector_norm(a[r : r + rows] - b[r : r + rows])) ** 2 for r in range(0, a.shape[0], rows)
    )
    return squares**0.5


def norm64(x: torch.Tensor) -> float:
    """``||x||_F`` accumulated in float64."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))
