"""Procrustes targets of decoupled merging: ``"global"`` (``T_i = W_i``) and ``"conflict"`` (DESIGN section 4).

Conflict-aware: ``tau_i = W_i - W0`` (torch layout ``(out, in)``); per output row (cosine along
torch ``dim=1``) keep the rows of ``tau_i`` whose cosine with the weighted mean task vector
``sum_j w_j tau_j`` is negative: ``T_i = W0 + tau_i * mask_i``. ``None`` means no rotation at all.
"""

from __future__ import annotations

import torch

from .stats import DecoupleStats

TARGETS = ("global", "conflict", None)


def conflict_rows(task_vector: torch.Tensor, mean: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Rows (``dim=1`` cosine) of one ``tau_i`` (``(out, in)``) pointing against the weighted mean
    task vector ``mean = sum_j w_j tau_j``: a bool ``(out,)`` mask, True where cosine < 0.
    A zero row has cosine 0 and is not kept. Computed by blocks of ``rows`` rows (the cosine's
    temporaries are block-sized)."""
    cos = torch.nn.functional.cosine_similarity
    return torch.cat(
        [cos(task_vector[r : r + rows], mean[r : r + rows], dim=1) < 0 for r in range(0, task_vector.shape[0], rows)]
    )


def conflict_target(
    f: torch.Tensor, base: torch.Tensor, mean: torch.Tensor, stats: DecoupleStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conflict target ``W0 + tau_i * mask_i`` of the expert ``f`` and its row mask (rows of
    ``tau_i`` against the weighted mean task vector ``mean``); records the rows kept in ``stats``."""
    t = f - base
    keep = conflict_rows(t, mean)
    stats.rows_kept.append(int(keep.sum()))
    return t.mul_(keep[:, None]).add_(base), keep  # in place
