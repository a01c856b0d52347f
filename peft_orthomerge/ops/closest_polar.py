"""Closest-to-identity optimal orthogonal factors for Procrustes problems that may be rank-deficient.

Conventions (DESIGN section 4): torch layout, ``W`` is ``(out, in)``; the rotation ``P`` (``in x in``)
acts on the input side, ``W0 @ P``. ``P`` maximises ``tr(P^T M)`` for ``M = W0^T T``. With
``M = U S V^T`` of rank ``k`` the optimal set is ``P = U_1 V_1^T + U_2 Z V_2^T`` (``Z`` any
orthogonal map between the complements); every solver here takes the one **closest to the
identity**, ``Z = polar(U_2^T V_2)``, and returns it in SO(n): if ``det P = -1`` the sign of
``Z``'s weakest direction is flipped (free when ``k < n``), else of ``M``'s weakest (Kabsch).
``W0`` against itself gives ``P = I``.

- `closest_polar_svd`: one square ``M``, full SVD.
- `thin_closest_polar_svd`: ``M = a^T b`` with ``a, b`` ``(out, m)``, ``out < m``, two ``out x out`` SVDs.
- `reduced_closest_polar`: the reduced-basis case ``a^T = [R0; 0]``, factored ``(P_c, Z, Y)``.
- `closest_polar_eigh`: one square nonsingular ``M`` from the eigendecomposition of ``M^T M``, certified.
- `closest_polar`: one square ``M`` by certified Newton-Schulz or eigh, else `closest_polar_svd`.
- `polar_near_orthogonal` / `polar_eigh`: ``polar`` of a block of an orthogonal matrix, certified.
Generic polar factors (no rank rule) are in `procrustes`.
"""

from __future__ import annotations

import torch

from .lapack import svd
from .orthogonality import probe_orthogonality_error
from .procrustes import PolarResult, default_tol, eigh_tol, newton_schulz, polar_by_eigh

RANK_RTOL = 1e-11  # float64: singular values of M below this fraction of the largest count as zero


def rank_rtol(dtype: torch.dtype) -> float:
    """The rank threshold for math in ``dtype``: `RANK_RTOL`, or ``100 eps`` where that is larger
    (float32: 1.2e-5). Singular values of ``M`` computed in ``dtype`` carry an absolute error of a
    few ``eps ||M||``; a threshold below that would count rounding noise on the null space of a
    rank-deficient ``M`` (``out < in``) as rank, and the rotation then turns that null space
    arbitrarily instead of leaving it alone (the closest-to-identity rule)."""
    return max(RANK_RTOL, 100 * torch.finfo(dtype).eps)


def closest_polar_svd(m: torch.Tensor, rtol: float) -> torch.Tensor:
    """Closest-to-identity optimal orthogonal factor of one square ``m``, in SO(n) (see module doc)."""
    n = m.shape[-1]
    u, s, vh = svd(m)
    smax = float(s[0]) if n else 0.0
    k = int((s > rtol * smax).sum()) if smax > 0 else 0
    v = vh.T
    u1v1 = u[:, :k] @ vh[:k]
    if k == n:
        p = u1v1 + 0  # copy
        if float(torch.linalg.det(p)) < 0:
            u = u.clone()
            u[:, -1] = -u[:, -1]
            p = u @ vh
        return p
    u2, v2 = u[:, k:], v[:, k:]
    uz, _, vzh = svd(u2.T @ v2)
    p = u1v1 + u2 @ (uz @ vzh) @ v2.T
    if float(torch.linalg.det(p)) < 0:
        uz = uz.clone()
        uz[:, -1] = -uz[:, -1]
        p = u1v1 + u2 @ (uz @ vzh) @ v2.T
    return p


def closest_polar_eigh(m: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Closest-to-identity optimal factor of one square ``m`` in SO(n) by `procrustes.polar_by_eigh`:
    ``(P, ||P^T P - I||_F)``, or ``(None, error)`` when the error exceeds `procrustes.eigh_tol`
    (then ``m`` is too ill-conditioned or singular for this route, and the rank rule of
    `closest_polar_svd` may apply). Certified, ``m`` has full rank, so the optimum is unique up to
    the det fix: ``det P = -1`` flips ``M``'s weakest direction (Kabsch), ``P (I - 2 v v^T)`` with
    ``v`` the weakest right singular vector, as `closest_polar_svd` does."""
    p, err, v = polar_by_eigh(m)
    error = float(err)
    if not error <= eigh_tol(m.dtype):
        return None, error
    if float(torch.linalg.det(p)) < 0:
        weakest = v[:, :1]
        p = p - 2 * (p @ weakest) @ weakest.T
    return p, error


def thin_closest_polar_svd(
    a: torch.Tensor, b: torch.Tensor, rtol: float, base_qr: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """Same answer as `closest_polar_svd` of ``M = a^T b`` for ``a, b`` of shape ``(out, m)``,
    ``out < m``, when ``rank(M) = out``; two ``out x out`` SVDs instead of one ``m x m``.

    ``range(M) = rows(a)`` and ``corange(M) = rows(b)``, so ``U_1 V_1^T`` comes from the SVD of the
    core ``Q_a^T M Q_b`` and the completion from the polar factor of ``U_2^T V_2`` with ``U_2, V_2``
    the orthogonal complements from complete QRs. Returns ``None`` when ``rank(M) < out``.
    ``base_qr``: ``torch.linalg.qr(a.T, mode="complete")`` when the caller already has it (one
    ``a`` against many ``b``: the base against every expert).
    """
    out = a.shape[0]
    qa, ra = torch.linalg.qr(a.T, mode="complete") if base_qr is None else base_qr
    qb, rb = torch.linalg.qr(b.T, mode="complete")
    core = ra[:out] @ rb[:out].T  # Q_a^T (a^T b) Q_b
    uc, sc, vch = svd(core)
    if not float(sc[-1]) > rtol * float(sc[0]):
        return None
    u1 = qa[:, :out] @ uc
    v1 = qb[:, :out] @ vch.T
    u2, v2 = qa[:, out:], qb[:, out:]
    uz, _, vzh = svd(u2.T @ v2)
    p = u1 @ v1.T + u2 @ (uz @ vzh) @ v2.T
    if float(torch.linalg.det(p)) < 0:
        uz = uz.clone()
        uz[:, -1] = -uz[:, -1]
        p = u1 @ v1.T + u2 @ (uz @ vzh) @ v2.T
    return p


def complete_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Complete QR ``x = Y [R; 0]`` of a tall ``(m, r)`` matrix and ``det(Y)`` (+-1), for free on the
    CPU: ``Y`` is a product of Householder reflectors, each with ``det = -1`` unless its ``tau`` is 0."""
    m, r = x.shape
    full = torch.zeros(m, m, dtype=x.dtype, device=x.device).T  # column-major: LAPACK's layout, no copies
    full[:, :r] = x
    h, tau = torch.geqrf(full[:, :r])
    full[:, :r] = h
    y = torch.linalg.householder_product(full, tau)  # the r reflectors applied to all m columns
    if x.device.type == "cpu":  # LAPACK's dlarfg: tau = 0 exactly when the reflector is the identity
        det = -1.0 if int((tau != 0).sum()) % 2 else 1.0
    else:  # other backends' conventions are not relied on
        det = 1.0 if float(torch.linalg.det(y)) > 0 else -1.0
    return y, torch.triu(h[:r]), det


def reduced_closest_polar(
    r0: torch.Tensor, bt: torch.Tensor, rtol: float, solver: str = "svd", info: PolarResult | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`thin_closest_polar_svd` for ``a^T = [r0; 0]`` (``r0`` ``(k, k)``, ``bt = b^T`` ``(k + r, k)``, ``r <= k``), factored.

    ``rows(a)`` is the first ``k`` coordinates, so ``Q_a = I``: with ``b^T = Y [R_b; 0]`` the core is
    ``r0 R_b^T = U_c S V_c^T``, ``U_1 V_1^T = [P_c Y_1^T; 0]`` (``P_c = U_c V_c^T``) and the
    completion ``U_2 Z V_2^T = [0; Z Y_2^T]`` with ``Z = polar(Y[k:, k:])`` (closest to the
    identity, `polar_near_orthogonal` where certified), det-fixed on ``Z``'s weakest direction.
    ``solver="eigh"``: ``P_c`` by `procrustes.polar_by_eigh` where certified (then the core has
    full rank), else the SVD (counted in ``info.fallback`` when ``info`` is given). Returns
    ``(P_c, Z, Y)`` with ``P = blockdiag(P_c, Z) Y^T``, or ``None`` when ``rank(M) < k``.
    """
    k = r0.shape[0]
    y, rb, det_y = complete_qr(bt)
    core = r0 @ rb.T
    pc, err, _ = polar_by_eigh(core) if solver == "eigh" else (None, None, None)
    if pc is None or not float(err) <= eigh_tol(core.dtype):
        if info is not None and solver == "eigh":
            info.fallback = 1
        uc, sc, vch = svd(core)
        if not float(sc[-1]) > rtol * float(sc[0]):
            return None
        pc = uc @ vch
        del uc, vch
    del core
    sign = det_y * float(torch.linalg.det(pc))
    z = polar_near_orthogonal(y[k:, k:])
    if z is not None and sign * float(torch.linalg.det(z)) > 0:
        return pc, z, y
    # not certified, or det P = -1: the SVD (the det fix needs Z's weakest direction)
    uz, _, vzh = svd(y[k:, k:])
    z = uz @ vzh
    if sign * float(torch.linalg.det(z)) < 0:
        z = z - 2 * uz[:, -1:] @ vzh[-1:]
    return pc, z, y


def polar_near_orthogonal(
    a: torch.Tensor, tol: float | None = None, max_iter: int = 6, method: str | None = None
) -> torch.Tensor | None:
    """``polar(a)`` of a block ``a`` (``k x k``) of an orthogonal matrix (singular values in ``(0, 1]``,
    near 1 when the experts are near the base); ``None`` when it cannot be certified (the caller
    then uses the SVD). ``method`` ``"newton_schulz"`` (default for float32) or ``"eigh"`` (default
    for float64, where one thread runs it faster than 5 Newton-Schulz steps; see `polar_eigh`).

    Newton-Schulz: the unscaled step ``X <- X (3 I - X^T X) / 2``, at most ``max_iter`` steps.

    Certificate: with ``e = ||X^T X - I||_F`` (``delta_j = 1 - s_j^2``, ``|delta_j| <= e``) one step
    gives ``1 - s_j'^2 = delta_j^2 (3 + delta_j) / 4``, so ``||X'^T X' - I||_F <= e^2`` once ``e < 1``,
    and ``||X' - polar(a)||_F = ||1 - s'||_2 <= e^2`` (singular vectors are kept). The loop stops at
    ``e <= sqrt(tol)`` and takes one last step without measuring it (its Gram product is the
    expensive part); rounding in that step is checked with 8 random probes.
    ``tol`` defaults to ``100 sqrt(k) eps``.
    """
    k = a.shape[-1]
    tol = 100 * k**0.5 * torch.finfo(a.dtype).eps if tol is None else tol
    if method is None:
        method = "eigh" if a.dtype == torch.float64 else "newton_schulz"
    if method == "eigh":
        x = polar_eigh(a)
        return x if x is not None and probe_orthogonality_error(x) <= tol else None
    x = a
    for step in range(max_iter):
        gram = x.T @ x
        gram.diagonal().sub_(1)
        err = float(torch.linalg.matrix_norm(gram))
        if not err < 1 and step >= 2:  # not converging quadratically: the SVD is cheaper
            return None
        gram.mul_(-0.5).diagonal().add_(1)  # (3 I - X^T X) / 2 = I - (X^T X - I) / 2
        x = x @ gram
        del gram
        if err * err <= tol and err < 1:
            break
    else:
        return None
    if not probe_orthogonality_error(x) <= tol:
        return None
    return x


def polar_eigh(a: torch.Tensor, floor: float = 0.25) -> torch.Tensor | None:
    """``polar(a) = a V diag(lambda)^-1/2 V^T`` from ``a^T a = V diag(lambda) V^T``; ``None`` when
    ``lambda_min < floor`` (the Gram matrix squares the condition number: with ``lambda`` in
    ``[floor, 1]`` it costs at most a factor ``1 / floor`` of accuracy, below that the SVD answers)."""
    try:
        lam, v = torch.linalg.eigh(a.T @ a)
    except torch.linalg.LinAlgError:  # did not converge: the caller's SVD answers
        return None
    if not float(lam[0]) >= floor:
        return None
    return a @ ((v * lam.rsqrt()) @ v.T)


def complement_projector(x: torch.Tensor) -> torch.Tensor:
    """``I - Q Q^T`` for ``Q`` an orthonormal basis of the columns of ``x`` (``(..., m, r)``, r < m)."""
    q = torch.linalg.qr(x).Q
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return eye - q @ q.transpose(-2, -1)


def closest_polar(m: torch.Tensor, solver: str, rtol: float) -> tuple[torch.Tensor, PolarResult]:
    """Closest-to-identity optimal ``P`` in SO(in) for one square ``M``: Newton-Schulz when
    ``solver == "newton_schulz"`` and it is certified with ``det P > 0``, `closest_polar_eigh` when
    ``solver == "eigh"`` and it is certified, else `closest_polar_svd` (its orthogonality error
    then estimated by probes)."""
    info = PolarResult(solver, 0.0)
    if solver == "eigh":
        p, info.orthogonality_error = closest_polar_eigh(m)
        if p is not None:
            return p, info
        info.fallback = 1
    if solver == "newton_schulz":
        x, err, info.iterations = newton_schulz(m)
        if float(err) <= default_tol(m.dtype, m.shape[-1]) and float(torch.linalg.det(x)) > 0:
            info.orthogonality_error = float(err)
            return x, info
        info.fallback = 1
    p = closest_polar_svd(m, rtol)
    info.orthogonality_error = probe_orthogonality_error(p)
    return p, info
