"""Decoupled task arithmetic in the reduced basis (``2 out <= in``): no residual is ever formed.

Conventions: torch layout, ``W`` is ``(out, in)``; ``P_i`` (``in x in``) acts on the input side,
``W0 @ P_i = X_i B_i^T`` with ``B_i = F blockdiag(I, G_i)`` (`frame.Rotation`, shared `frame.Frame`
``F``); skew parts canonical, ``Q_i = (P_i - I)(P_i + I)^-1``.

``W0 P + sum_i c_i (W_i - W0 P_i) = (W0 P F + E) F^T`` with ``E = sum_i c_i rho_i F`` summed in
frame coordinates: with ``W0 P_i = X_i B_i^T``, ``X_i = A C_i[:out]`` (``A = R0^T``,
``W0 B_i = [A, 0]``) and the target ``T_i = b_i B_i^T``, the residual is
``rho_i = r_i B_i^T + U_i`` with ``r_i = b_i - X_i`` and ``U_i = W_i - T_i`` (zero for the global
target; the conflict target's rows left at ``W0``), so ``rho_i F = [r_i1, r_i2 G_i^T] + U_i F``:
per task two ``out x out``-sized products and one ``out x out x (in - out)``, no
``(out, in) x (in, in)``; one ``(out, in)`` accumulator. The report's norms come from the same
small matrices (``B_i`` has orthonormal columns): ``||W0 (P_i - I)|| = ||X_i - [A, 0]||``,
``||rho_i||^2 = ||r_i||^2 + 2 <r_i, U_i B_i> + ||U_i||^2``. Norms are summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cayley import cayley_apply_leading
from ..frame import Rotation
from .solve import solver_feed
from .stats import DecoupleStats, SkewSum, merged_stats, norm64
from .targets import conflict_target


def _add_task(
    rot: Rotation,
    acc: torch.Tensor | None,
    f: torch.Tensor | None,
    drop: torch.Tensor | None,
    base: torch.Tensor,
    coeff: float,
    stats: DecoupleStats,
    i: int,
) -> torch.Tensor:
    """``acc += c_i rho_i F`` (allocated on first use) and task ``i``'s norms; returns ``acc``.
    ``drop``: rows of ``W_i`` (``f``) the conflict target left at ``W0`` (``U_i = tau_i`` there)."""
    out, n = base.shape
    a, g = rot.base_coords, rot.coeff
    x = rot.base_core_rows()  # W0 P_i = X B^T
    r = rot.target_coords.T - x  # T_i - W0 P_i = r B^T
    x[:, :out].sub_(a)  # W0 (P_i - I) = X B^T
    stats.orth_part_norms[i] = norm64(x)
    del x
    if acc is None:
        acc = base.new_zeros(out, n)
    acc[:, :out].add_(r[:, :out], alpha=coeff)
    acc[:, out:].addmm_(r[:, out:], g.T, alpha=coeff)
    rho2 = norm64(r) ** 2
    if drop is not None:  # rows of W_i the conflict target left at W0: U_i = tau_i there
        u = f[drop] - base[drop]
        uf = rot.frame.right(u)
        acc[drop] += coeff * uf
        ub = torch.cat([uf[:, :out], uf[:, out:] @ g], dim=-1)
        del uf
        cross = float(torch.sum(r[drop].to(torch.float64) * ub.to(torch.float64)))
        rho2 = max(rho2 + 2 * cross + norm64(u) ** 2, 0.0)
        del u, ub
    stats.residual_norms[i] = rho2**0.5
    return acc


def _assemble(
    base: torch.Tensor, acc: torch.Tensor | None, plain: torch.Tensor | None, skew: SkewSum, c: float | None
) -> torch.Tensor:
    """``(W0 P F + E) F^T`` (plus the unrotated experts' ``sum_i c_i tau_i``)."""
    if acc is None:  # every target was the base
        merged = base.clone()
    elif c is None:  # the rotations cancel: W0 + E F^T
        merged = skew.frame.right_t(acc).add_(base)
    else:
        # W0 @ P = (W0 F) cayley(c S_F) F^T with S_F the skew sum in frame coordinates
        rotated = cayley_apply_leading(skew.base_coords, skew.skew, c)
        skew.skew = skew.base_coords = None
        merged = skew.frame.right_t(rotated.add_(acc))
    return merged if plain is None else merged.add_(plain)


def merge_ta_reduced(
    base: torch.Tensor,
    full: Callable[[int], torch.Tensor],
    weights: list[float],
    coeffs: list[float],
    target: str,
    mean: torch.Tensor | None,
    stats: DecoupleStats,
    solver: str,
    rtol: float,
    name: str | None,
) -> tuple[torch.Tensor, DecoupleStats]:
    """Task arithmetic (``rho = sum_i c_i rho_i``) in the reduced basis (``2 out <= in``), no residual
    formed (see the module docstring). ``full(i)`` is expert ``i`` in the working dtype; ``stats``
    already holds the task-vector norms."""
    out, n = base.shape
    pending, solved = solver_feed(base, solver, rtol)
    skew = SkewSum()
    count = len(weights)
    stats.skew_norms = [0.0] * count
    stats.orth_part_norms = [0.0] * count
    stats.residual_norms = list(stats.task_vector_norms)  # rho_i = tau_i where P_i = I
    acc: torch.Tensor | None = None  # E = sum_i c_i rho_i F, (out, in), frame coordinates
    plain: torch.Tensor | None = None  # sum_i c_i tau_i of unrotated experts (conflict target, no row kept)
    for i in range(count):
        f = full(i)
        drop = None
        if target == "global":
            t = f
        else:
            t, keep = conflict_target(f, base, mean, stats)
            drop = (~keep).nonzero().squeeze(-1) if not bool(keep.all()) else None
            del keep
        if torch.equal(t, base):  # P_i = I, rho_i = tau_i (zero for the global target)
            if target != "global":
                plain = base.new_zeros(out, n) if plain is None else plain
                plain.add_(f - base, alpha=coeffs[i])
            del t, f
            continue
        pending.append(t)
        del t
        if drop is None:  # W_i is not needed again: free it while the rotation is solved
            f = None
        rot, info = next(solved)
        stats.skew_norms[i] = skew.add(rot, info, weights[i], base, name)
        acc = _add_task(rot, acc, f, drop, base, coeffs[i], stats, i)
        del rot, f
    solved.close()  # drops the shared QR of W0^T
    c = merged_stats(stats, skew)
    return _assemble(base, acc, plain, skew, c), stats
