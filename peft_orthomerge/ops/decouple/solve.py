"""Procrustes rotations of one base weight against many targets (the reduced basis when ``2 out <= in``).

Conventions: torch layout, ``W`` is ``(out, in)``; ``P_i`` (``in x in``, in SO(in)) acts on the
input side and minimises ``||T_i - W0 @ P_i||_F`` (the paper's ``R = P^T``), closest to the identity
among the optimal ones (`closest_polar`). Reduced basis: ``B_i = [Q0, Q_i] = F blockdiag(I, G_i)``
with the frame ``F`` of one complete QR of ``W0^T`` shared by all targets (`frame.Frame`), and
``P_i = I + B_i (C_i - I) B_i^T`` (`frame.Rotation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ...errors import IncompatibleInputsError
from ..closest_polar import (
    closest_polar_eigh,
    closest_polar_svd,
    complement_projector,
    rank_rtol,
    reduced_closest_polar,
    thin_closest_polar_svd,
)
from ..frame import Frame, Rotation
from ..lapack import svd
from ..procrustes import PolarResult, check_solver, default_tol, demoted, newton_schulz, resolve_solver

PROBE_COLUMNS = 128  # at most this many random probes of a target's new rows (a LoRA rank up to ~100)


def _probe_width(out: int) -> int:
    """Probe columns for a target of ``out`` rows: ``out // 8`` up to `PROBE_COLUMNS` (a failed probe
    then costs at most about a fifth of the QR it precedes); 0 (no probe) below 8."""
    width = min(PROBE_COLUMNS, out // 8)
    return width if width >= 8 else 0


def _low_rank_rows(x: torch.Tensor, width: int, rtol: float, scale: float) -> tuple[torch.Tensor, torch.Tensor] | bool:
    """``(G, R)`` with ``x^T = G R`` (``G`` ``(m, r)`` orthonormal columns, ``R`` ``(r, out)``) when ``x``
    (``(out, m)``) has numerical rank ``1 <= r < width``; else ``False`` when the rank is larger
    (the caller stops probing this weight's targets), ``True`` when it is 0.

    A randomized range finder: ``Y = x^T Omega`` for ``width`` seeded Gaussian probes, ``Q`` its
    orthonormal basis, ``Z = x Q``; accepted only when the residual ``||x - Z Q^T||_F`` is at most
    ``rtol * scale`` (``scale``: the target's norm; certified, not assumed: a full-rank ``x`` is
    refused and the caller's QR answers). The rank is then the number of singular values of ``Z``
    above ``rtol * scale``, and ``G = Q V_r``, ``R = (U_r S_r)^T``. What is left out (at most
    ``rtol`` relative, the rank rule's threshold) is rounding noise where the target's rows lie in
    ``W0``'s: a LoRA expert ``W0 + B A`` adds only ``rank(A)`` rows."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    omega = torch.randn(x.shape[0], width, dtype=x.dtype, device=x.device, generator=gen)
    q = torch.linalg.qr(x.T @ omega).Q
    z = x @ q
    if not float(torch.linalg.matrix_norm(torch.addmm(x, z, q.T, alpha=-1))) <= rtol * scale:
        return False
    u, sv, vh = svd(z, full_matrices=False)
    rank = int((sv > rtol * scale).sum())
    if rank >= width:
        return False
    return (q @ vh[:rank].T, (u[:, :rank] * sv[:rank]).T) if rank else True


def _reduced_target(
    rot: Rotation, frame: Frame, r0: torch.Tensor, target: torch.Tensor, out: int, probe: int, rtol: float
) -> tuple[torch.Tensor, bool]:
    """Fills ``rot``'s basis for ``target`` in the frame; returns ``b_i^T`` ``(out + r, out)`` with
    ``T_i = b_i B_i^T`` (``r = out`` from a QR, or the numerical rank of the target's rows outside
    ``W0``'s when ``probe`` columns certify that it is smaller, `_low_rank_rows`; ``probe = 0``: no
    probe) and whether probing the next target is worth it (``False`` after a full-rank one)."""
    tf = frame.right(target)  # T_i F = [T_i Q0, T_i Q0c], one product
    # G_i inside the complement of Q0, so Q_i stays orthogonal to Q0 even where T_i adds nothing
    # to the rows of W0 (T_i ~ W0); Q_i^T T_i^T = G^T Q0c^T T_i^T = R_i
    found = _low_rank_rows(tf[:, out:], probe, rtol, float(torch.linalg.matrix_norm(tf))) if probe else False
    # else a QR of Q0c^T T_i^T ((n - out, out), a column-major view, as LAPACK wants it)
    g, ri = found if isinstance(found, tuple) else torch.linalg.qr(tf[:, out:].T)
    bt = torch.cat([tf[:, :out].T, ri], dim=0)  # b_i^T
    del ri, tf
    rot.frame, rot.coeff, rot.base_coords, rot.target_coords = frame, g, r0.T, bt
    return bt, found is not False


def _padded_base(r0: torch.Tensor, size: int) -> torch.Tensor:
    """``a = [R0^T, 0]`` (``(out, size)``): ``W0 = a B_i^T`` in a reduced basis of ``size`` columns."""
    out = r0.shape[0]
    return torch.cat([r0.T, r0.new_zeros(out, size - out)], dim=-1)


def _newton_schulz_core(
    a: torch.Tensor, bt: torch.Tensor, info: PolarResult, tol: float | None, max_iter: int
) -> torch.Tensor | None:
    """The core ``C`` by Newton-Schulz on ``M = a^T b`` (plus ``c`` times the complement projectors
    when ``M`` is rank-deficient, which selects the closest-to-identity completion); ``None`` (and
    ``info.fallback = 1``) unless certified with ``det C > 0``."""
    out, size = a.shape[0], bt.shape[0]
    m = a.T @ bt.T
    amat = m
    if out < size:
        scale = torch.linalg.matrix_norm(m) / min(out, size) ** 0.5
        amat = m + scale * (complement_projector(a.T) @ complement_projector(bt))
    x, err, info.iterations = newton_schulz(amat, tol=tol, max_iter=max_iter)
    del amat
    limit = default_tol(m.dtype, size) if tol is None else tol
    if float(err) <= limit and float(torch.linalg.det(x)) > 0:
        return x
    info.fallback = 1
    return None


def iter_procrustes(
    w0: torch.Tensor,
    targets: Iterable[torch.Tensor],
    *,
    solver: str = "auto",
    rtol: float | None = None,
    tol: float | None = None,
    max_iter: int = 60,
) -> Iterator[tuple[Rotation, PolarResult]]:
    """Closest-to-identity ``P_i`` in SO(in) minimising ``||T_i - W0 @ P_i||_F``, one target at a time.

    ``w0`` and each target are ``(out, in)`` in the same dtype (use fp64). Work shared by all
    targets (the QR of ``W0^T``) is done once; only one target's basis is alive at a time. No
    shortcut for ``T_i = W0``: the formula itself returns ``P = I`` there (to rounding).
    Yields ``(rotation, info)``; ``info.factor`` is ``None`` (the rotation is the factor).

    The targets share ``W0``, and with it the conditioning that decides whether the fast solvers
    (``"eigh"``, ``"newton_schulz"``) can be certified: after one target falls back to the SVD,
    the rest go to the SVD directly (`procrustes.demoted`; each still counts in ``info.fallback``).

    Reduced basis: a target whose rows add only ``r < out`` directions to ``W0``'s (a LoRA
    expert ``W0 + B A``: ``r = rank(A)``) gets a core of ``out + r`` instead of ``2 out``
    (`_low_rank_rows`, certified by its residual); after one target of full rank the others skip
    that probe.
    """
    requested = resolve_solver(check_solver(solver), w0.device, w0.dtype)
    solver = requested
    rtol = rank_rtol(w0.dtype) if rtol is None else rtol
    out, n = w0.shape
    reduced = 2 * out <= n
    if reduced:
        # B_i = [Q0, Q_i] = F blockdiag(I, G_i) with the frame F = [Q0, Q0c] (one complete QR of
        # W0^T shared by all tasks): Q0 spans the rows of W0, Q_i the part of the rows of T_i
        # outside it; then W0 = a B_i^T with a = [R0^T, 0] and T_i = b_i B_i^T exactly.
        frame, r0 = Frame.of(w0)
        probe = _probe_width(out)
    base_qr = None  # the complete QR of W0^T for the thin SVD route (out < in, unreduced), made once
    for target in targets:
        rot = Rotation(n)
        if reduced:
            bt, keep_probing = _reduced_target(rot, frame, r0, target, out, probe, rtol)
            probe = probe if keep_probing else 0  # a full-rank target: the others of this W0 likely too
            a = None
        else:
            a, bt = w0, target.T
        del target  # not held across the yield (bt may still view it)
        size = bt.shape[0]
        info = PolarResult(requested, 0.0, fallback=int(solver != requested))
        if solver == "newton_schulz":
            a = _padded_base(r0, size) if a is None else a
            rot.core = _newton_schulz_core(a, bt, info, tol, max_iter)
        if rot.core is None and reduced:
            rot.factors = reduced_closest_polar(r0, bt, rtol, solver, info)
        if rot.core is None and rot.factors is None:
            a = _padded_base(r0, size) if a is None else a
            if out < size and not reduced and base_qr is None:
                base_qr = torch.linalg.qr(w0.T, mode="complete")
            rot.core = thin_closest_polar_svd(a, bt.T, rtol, base_qr) if out < size else None
            if rot.core is None:
                m = a.T @ bt.T
                if solver == "eigh" and out >= size:  # M can have full rank only when out >= in
                    rot.core, _ = closest_polar_eigh(m)
                    info.fallback = int(rot.core is None)
                if rot.core is None:
                    rot.core = closest_polar_svd(m, rtol)
                del m
        info.orthogonality_error = rot.orthogonality_bound()
        solver = demoted(solver, info)
        del bt, a
        yield rot, info


def procrustes_batch(
    w0: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any
) -> tuple[list[Rotation], PolarResult]:
    """All of `iter_procrustes` at once; the info aggregates (max error, total fallbacks)."""
    rotations, total = [], None
    for rot, info in iter_procrustes(w0, targets, **kwargs):
        rotations.append(rot)
        total = info if total is None else _combine(total, info)
    return rotations, total or PolarResult(resolve_solver(kwargs.get("solver", "auto"), w0.device, w0.dtype), 0.0)


def _combine(a: PolarResult, b: PolarResult) -> PolarResult:
    return PolarResult(
        a.solver,
        max(a.orthogonality_error, b.orthogonality_error),
        max(a.iterations, b.iterations),
        a.fallback + b.fallback,
    )


def procrustes_rotation(
    w0: torch.Tensor, w_target: torch.Tensor, *, solver: str = "auto", rtol: float | None = None
) -> torch.Tensor:
    """Dense orthogonal ``P`` (``in x in``, det +1) minimising ``||w_target - w0 @ P||_F``, closest to I.

    Computed in float64; ``w_target == w0`` gives exactly the identity.
    """
    check_pair(w0, w_target)
    w0d = w0.to(torch.float64)
    wt = w_target.to(device=w0.device, dtype=torch.float64)
    if torch.equal(w0d, wt):
        return torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device)
    rots, _ = procrustes_batch(w0d, wt[None], solver=solver, rtol=rtol)
    return rots[0].dense()


def check_pair(w0: torch.Tensor, w: torch.Tensor, name: str | None = None) -> None:
    """`IncompatibleInputsError` unless ``w0`` is 2-D and ``w`` has its shape."""
    if w0.dim() != 2 or tuple(w.shape) != tuple(w0.shape):
        raise IncompatibleInputsError(
            f"shape mismatch: base {tuple(w0.shape)} vs expert {tuple(w.shape)}; decoupling needs equal 2-D shapes",
            tensor=name,
        )


def solver_feed(
    base: torch.Tensor, solver: str, rtol: float
) -> tuple[list[torch.Tensor], Iterator[tuple[Rotation, PolarResult]]]:
    """`iter_procrustes` fed on demand: append one target to the list, then ``next()`` the iterator
    for its rotation (only that target is alive; the shared QR of ``W0^T`` is made once)."""
    pending: list[torch.Tensor] = []

    def next_target() -> Iterator[torch.Tensor]:
        while pending:
            yield pending.pop()

    return pending, iter_procrustes(base, next_target(), solver=solver, rtol=rtol)
