"""Orthogonal-residual decoupling of one weight matrix (paper Algorithm 2, DESIGN section 4).

Conventions: torch layout, ``W`` is ``(out, in)``, ``y = x @ W.T``. A rotation ``P`` (``in x in``)
acts on the input side: ``W0 @ P`` (the paper's ``R W0`` with ``R = P^T`` in its ``d_in x d_out``
layout).

For expert weights ``W_i`` and the base ``W0``:

1. ``P_i = argmin_{P in SO(in)} ||T_i - W0 @ P||_F`` with target ``T_i`` (``"global"``: ``W_i``;
   ``"conflict"``: ``W0 + tau_i * mask_i``, rows of ``tau_i = W_i - W0`` whose cosine with the
   weighted-mean task vector is negative, cosine per output row, torch ``dim=1``).
   The optimum maximises ``tr(P^T M)``, ``M = W0^T T_i``. With ``M = U S V^T`` of rank ``k`` the
   optimal set is ``P = U_1 V_1^T + U_2 Z V_2^T`` (``Z`` any orthogonal map between the
   complements). We take the one **closest to the identity**: ``Z = polar(U_2^T V_2)``, i.e.
   ``P = polar(M + c (I - U_1 U_1^T)(I - V_1 V_1^T))`` for any ``c > 0``. Then ``W0`` against
   itself gives ``P = I``, and a rank-deficient layer (``out < in``: GQA k/v, ``down_proj``) gets
   no arbitrary rotation on its null space. If ``det P = -1`` the sign of ``Z``'s weakest
   direction is flipped (free when ``k < in``), else of ``M``'s weakest (Kabsch), so ``P`` is in SO(in).
2. Reduced basis: when ``2 out < in`` the problem lives in the ``m = 2 out`` dimensional span
   ``B_i = [Q0, Q_i] = F blockdiag(I, G_i)`` of the rows of ``W0`` (``Q0``) and of ``T_i``
   (``Q_i = Q0c G_i``, a QR inside the complement of ``Q0``), with the frame ``F = [Q0, Q0c]`` from
   one complete QR of ``W0^T`` shared by all tasks, kept as Householder reflectors (`Frame`: no
   ``in x in`` matrix, products by ``ormqr``); ``P = I + B (C - I) B^T`` with an ``m x m``
   core ``C``. Since ``W0 B_i = [R0^T, 0]`` the range side of ``M`` is the first ``out``
   coordinates and ``C = blockdiag(P_c, Z) Y^T`` (``Y`` from one complete QR of ``b_i^T``, ``P_c``
   from an ``out x out`` SVD, ``Z = polar(Y[out:, out:])`` by certified Newton-Schulz, a block of
   an orthogonal matrix, or an SVD where that is not certified or the det fix is needed;
   `_reduced_closest_polar_svd`), kept factored. The skew
   matrices are summed in frame coordinates (``F^T Q_i F``, no ``in x in`` product per task) and
   the merged rotation is applied as ``W0 P = (W0 F) cayley(c S_F) F^T``. Tasks are processed one
   at a time, so one task's basis is alive at a time.
3. ``Q_i = (P_i - I)(P_i + I)^-1 = B Q_c B^T`` (skew); an eigenvalue of ``P_i`` within 1e-6 of -1
   (``||Q_i||_F > 1e6``) raises `NumericalError` naming the module.
4. ``Q = (sum_i w_i ||Q_i||_F) S / ||S||_F``, ``S = sum_i w_i Q_i`` (as for OFT; ``S = 0`` gives
   ``Q = 0``); ``P = (I + Q)(I - Q)^-1``, applied as ``W0 P = 2 W0 (I - Q)^-1 - W0`` (one LU solve,
   no inverse, `cayley_apply`).
5. Residuals ``rho_i = W_i - W0 @ P_i`` merged with a Euclidean method (`registry`); the result
   is ``W0 @ P + rho_merged``. ``target=None`` skips 1-4: ``W0 + merge(tau_i)``. Task arithmetic
   never forms ``rho_i``: with ``2 out >= in`` `decouple_merge` hands it to the row-block path
   (`decouple_rows`: ``W0 + sum_i c_i tau_i + W0 X`` from ``in x in`` Gram matrices); in the
   reduced basis `_merge_ta_reduced` sums ``c_i rho_i F`` in frame coordinates from the small
   per-task matrices and applies ``(W0 P F + sum_i c_i rho_i F) F^T`` once.

Everything is computed in float64 by default (``dtype``); results come back in that dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, IncompatibleInputsError, NumericalError
from .euclidean import ta_coefficients
from .orthogonality import orthogonality_errors
from .procrustes import (
    check_solver,
    default_tol,
    newton_schulz,
    resolve_solver,
)
from .registry import get_euclidean, merge_iter

TARGETS = ("global", "conflict", None)
RANK_RTOL = 1e-11  # singular values of M below this fraction of the largest count as zero
CAYLEY_LIMIT = 1e6  # ||Q||_F above this: P has an eigenvalue within ~2e-6 of -1
ZERO_RTOL = 1e-12  # ||S|| below this fraction of sum w_i ||Q_i||: exact cancellation


@dataclass
class Frame:
    """The ``in x in`` orthogonal ``F`` of a complete QR ``W0^T = F [R0; 0]``, kept as LAPACK's
    Householder reflectors (`torch.geqrf`: ``in x out`` numbers instead of ``in x in``); products
    with ``F`` go through `torch.ormqr` (fewer flops than a dense product, no ``in x in`` matrix).
    ``F[:, :out]`` spans the rows of ``W0``."""

    reflectors: torch.Tensor
    tau: torch.Tensor

    @classmethod
    def of(cls, w0: torch.Tensor) -> tuple[Frame, torch.Tensor]:
        """The frame of ``w0`` (``(out, in)``, ``2 out < in``) and ``R0`` (``(out, out)``, upper triangular)."""
        h, tau = torch.geqrf(w0.T)
        return cls(h, tau), torch.triu(h[: w0.shape[0]])

    @property
    def n(self) -> int:
        return self.reflectors.shape[0]

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ F``."""
        return torch.ormqr(self.reflectors, self.tau, x, left=False, transpose=False)

    def right_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ F^T``."""
        return torch.ormqr(self.reflectors, self.tau, x, left=False, transpose=True)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """``F @ x``."""
        return torch.ormqr(self.reflectors, self.tau, x, left=True, transpose=False)

    def dense(self) -> torch.Tensor:
        """``F`` itself (``in x in``), for tests and dense fallbacks."""
        return self.left(torch.eye(self.n, dtype=self.reflectors.dtype, device=self.reflectors.device))


@dataclass
class Rotation:
    """An orthogonal ``P = I + B (C - I) B^T`` stored compactly.

    ``frame`` `Frame` ``F`` (``in x in`` orthogonal, shared by all tasks of one call) and ``coeff`` ``G``
    give the basis ``B = [F[:, :k], F[:, k:] @ G]`` (``(in, m)``, orthonormal columns); ``frame``
    ``None`` means the standard basis (``m = in``, ``P = C``). The core ``C`` (``m x m``
    orthogonal) is stored densely (``core``) or factored (``factors = (P_c, Z, Y)``,
    ``C = blockdiag(P_c, Z) @ Y^T``, the reduced SVD path). ``base_coords`` ``A`` (``(out, k)``),
    when set, gives ``W0 @ B = [A, 0]``: ``W0 @ P`` then costs no product with ``W0``.
    ``target_coords`` ``b^T`` (``(m, out)``), when set, gives the target ``T = b B^T``.
    """

    n: int
    core: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    frame: Frame | None = None
    coeff: torch.Tensor | None = None
    base_coords: torch.Tensor | None = None
    target_coords: torch.Tensor | None = None

    @property
    def basis(self) -> torch.Tensor | None:
        if self.frame is None:
            return None
        k = self.frame.n - self.coeff.shape[0]
        coords = self.coeff.new_zeros(self.frame.n, k + self.coeff.shape[1])  # blockdiag(I, G)
        coords[:k, :k].fill_diagonal_(1)
        coords[k:, k:] = self.coeff
        return self.frame.left(coords)

    def core_matrix(self) -> torch.Tensor:
        if self.core is not None:
            return self.core
        pc, z, y = self.factors
        return torch.cat([pc @ y[:, : pc.shape[0]].T, z @ y[:, pc.shape[0] :].T], dim=0)

    def dense(self) -> torch.Tensor:
        core = self.core_matrix()
        if self.frame is None:
            return core.clone()
        eye = torch.eye(self.n, dtype=core.dtype, device=core.device)
        basis = self.basis
        delta = core - torch.eye(core.shape[-1], dtype=core.dtype, device=core.device)
        return eye + basis @ delta @ basis.T

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """``w @ P`` without forming ``P``."""
        if self.frame is None:
            return w @ self.core_matrix()
        basis = self.basis
        wb = w @ basis
        return w + (wb @ self.core_matrix() - wb) @ basis.T

    def rotate_base(self, w0: torch.Tensor) -> torch.Tensor:
        """``W0 @ P`` for the base this rotation was solved for (uses ``base_coords`` when set)."""
        if self.base_coords is None:
            return self.apply(w0)
        k = self.base_coords.shape[-1]
        ac = self.base_core_rows()  # [A, 0] C = A C[:k]
        # W0 = A F[:, :k]^T, so W0 @ P = (A C) B^T = [A C_1, A C_2 G^T] F^T
        return self.frame.right_t(torch.cat([ac[:, :k], ac[:, k:] @ self.coeff.T], dim=-1))

    def base_core_rows(self) -> torch.Tensor:
        """``A C[:k]`` (``(out, m)``, ``k = base_coords.shape[-1]``): ``W0 @ P = (A C[:k]) B^T`` needs
        nothing else of ``C``. Factored: ``A C[:k] = (A P_c) Y[:, :k]^T``."""
        a, k = self.base_coords, self.base_coords.shape[-1]
        if self.factors is not None:
            pc, _, y = self.factors
            return (a @ pc) @ y[:, :k].T
        return a @ self.core[:k]

    def skew_core(self, name: str | None = None) -> torch.Tensor:
        """``Q_c``, the inverse Cayley map of the core: ``Q = (P - I)(P + I)^-1 = B Q_c B^T``."""
        if self.factors is None:
            return inverse_cayley(self.core, name=name)
        pc, z, y = self.factors
        # built column-major, the layout of Y (a Householder product) and of LAPACK's LU
        return inverse_cayley(torch.block_diag(pc.T, z.T).T, name=name, right=y, overwrite=True)

    def skew(self, name: str | None = None) -> torch.Tensor:
        """Dense ``Q = (P - I)(P + I)^-1 = B Q_c B^T``."""
        qc = self.skew_core(name)
        if self.frame is None:
            return qc
        basis = self.basis
        return basis @ qc @ basis.T

    def add_skew_in_frame(self, acc: torch.Tensor, qc: torch.Tensor, alpha: float) -> None:
        """``acc += alpha * F^T Q F`` (frame coordinates) for ``Q = B Q_c B^T``, ``B = F blockdiag(I, G)``:
        never forms an ``in x in`` product per task."""
        k = self.frame.n - self.coeff.shape[0]
        g = self.coeff
        acc[:k, :k].add_(qc[:k, :k], alpha=alpha)
        top = qc[:k, k:] @ g.T
        acc[:k, k:].add_(top, alpha=alpha)
        acc[k:, :k].sub_(top.T.contiguous(), alpha=alpha)  # Q_c skew: the lower-left block is -(upper-right)^T
        del top
        acc[k:, k:].add_((g @ qc[k:, k:]) @ g.T, alpha=alpha)


@dataclass
class ProcrustesInfo:
    solver: str
    orthogonality_error: float
    iterations: int = 0
    fallback: int = 0


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
    merged_delta_norm: float | None = None  # ||out - W0||_F, set by the row-block path (`decouple_rows`)

    def as_extra(self) -> dict[str, float]:
        out: dict[str, float] = {"solver_error": self.solver_error, "solver_fallback": float(self.solver_fallback)}
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


# -- Procrustes -----------------------------------------------------------------------------------


def _closest_polar_svd(m: torch.Tensor, rtol: float) -> torch.Tensor:
    """Closest-to-identity optimal orthogonal factor of one square ``m``, in SO(n) (see module doc)."""
    n = m.shape[-1]
    u, s, vh = torch.linalg.svd(m)
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
    uz, _, vzh = torch.linalg.svd(u2.T @ v2)
    p = u1v1 + u2 @ (uz @ vzh) @ v2.T
    if float(torch.linalg.det(p)) < 0:
        uz = uz.clone()
        uz[:, -1] = -uz[:, -1]
        p = u1v1 + u2 @ (uz @ vzh) @ v2.T
    return p


def _thin_closest_polar_svd(a: torch.Tensor, b: torch.Tensor, rtol: float) -> torch.Tensor | None:
    """Same answer as `_closest_polar_svd` of ``M = a^T b`` for ``a, b`` of shape ``(out, m)``,
    ``out < m``, when ``rank(M) = out``; two ``out x out`` SVDs instead of one ``m x m``.

    ``range(M) = rows(a)`` and ``corange(M) = rows(b)``, so ``U_1 V_1^T`` comes from the SVD of the
    core ``Q_a^T M Q_b`` and the completion from the polar factor of ``U_2^T V_2`` with ``U_2, V_2``
    the orthogonal complements from complete QRs. Returns ``None`` when ``rank(M) < out``.
    """
    out = a.shape[0]
    qa, ra = torch.linalg.qr(a.T, mode="complete")
    qb, rb = torch.linalg.qr(b.T, mode="complete")
    core = ra[:out] @ rb[:out].T  # Q_a^T (a^T b) Q_b
    uc, sc, vch = torch.linalg.svd(core)
    if not float(sc[-1]) > rtol * float(sc[0]):
        return None
    u1 = qa[:, :out] @ uc
    v1 = qb[:, :out] @ vch.T
    u2, v2 = qa[:, out:], qb[:, out:]
    uz, _, vzh = torch.linalg.svd(u2.T @ v2)
    p = u1 @ v1.T + u2 @ (uz @ vzh) @ v2.T
    if float(torch.linalg.det(p)) < 0:
        uz = uz.clone()
        uz[:, -1] = -uz[:, -1]
        p = u1 @ v1.T + u2 @ (uz @ vzh) @ v2.T
    return p


def _complete_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
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


def _reduced_closest_polar_svd(
    r0: torch.Tensor, bt: torch.Tensor, rtol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`_thin_closest_polar_svd` for ``a^T = [r0; 0]`` (``r0`` ``(k, k)``, ``bt = b^T`` ``(2k, k)``), factored.

    ``rows(a)`` is the first ``k`` coordinates, so ``Q_a = I``: with ``b^T = Y [R_b; 0]`` the core is
    ``r0 R_b^T = U_c S V_c^T``, ``U_1 V_1^T = [P_c Y_1^T; 0]`` (``P_c = U_c V_c^T``) and the
    completion ``U_2 Z V_2^T = [0; Z Y_2^T]`` with ``Z = polar(Y[k:, k:])`` (closest to the
    identity), det-fixed on ``Z``'s weakest direction. Returns ``(P_c, Z, Y)`` with
    ``P = blockdiag(P_c, Z) Y^T``, or ``None`` when ``rank(M) < k``.
    """
    k = r0.shape[0]
    y, rb, det_y = _complete_qr(bt)
    uc, sc, vch = torch.linalg.svd(r0 @ rb.T)
    if not float(sc[-1]) > rtol * float(sc[0]):
        return None
    pc = uc @ vch
    del uc, vch
    sign = det_y * float(torch.linalg.det(pc))
    z = _polar_near_orthogonal(y[k:, k:])
    if z is not None and sign * float(torch.linalg.det(z)) > 0:
        return pc, z, y
    # not certified, or det P = -1: the SVD (the det fix needs Z's weakest direction)
    uz, _, vzh = torch.linalg.svd(y[k:, k:])
    z = uz @ vzh
    if sign * float(torch.linalg.det(z)) < 0:
        z = z - 2 * uz[:, -1:] @ vzh[-1:]
    return pc, z, y


def _polar_near_orthogonal(
    a: torch.Tensor, tol: float | None = None, max_iter: int = 6, method: str | None = None
) -> torch.Tensor | None:
    """``polar(a)`` of a block ``a`` (``k x k``) of an orthogonal matrix (singular values in ``(0, 1]``,
    near 1 when the experts are near the base); ``None`` when it cannot be certified (the caller
    then uses the SVD). ``method`` ``"newton_schulz"`` (default for float32) or ``"eigh"`` (default
    for float64, where one thread runs it faster than 5 Newton-Schulz steps; see `_polar_eigh`).

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
        x = _polar_eigh(a)
        return x if x is not None and _probe_orthogonality_error(x) <= tol else None
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
    if not _probe_orthogonality_error(x) <= tol:
        return None
    return x


def _polar_eigh(a: torch.Tensor, floor: float = 0.25) -> torch.Tensor | None:
    """``polar(a) = a V diag(lambda)^-1/2 V^T`` from ``a^T a = V diag(lambda) V^T``; ``None`` when
    ``lambda_min < floor`` (the Gram matrix squares the condition number: with ``lambda`` in
    ``[floor, 1]`` it costs at most a factor ``1 / floor`` of accuracy, below that the SVD answers)."""
    lam, v = torch.linalg.eigh(a.T @ a)
    if not float(lam[0]) >= floor:
        return None
    return a @ ((v * lam.rsqrt()) @ v.T)


def _probe_orthogonality_error(x: torch.Tensor, probes: int = 8) -> float:
    """Estimate of ``||X^T X - I||_F`` from random probes (``E ||E p||^2 = ||E||_F^2``), seeded."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    p = torch.randn(x.shape[-1], probes, generator=gen, dtype=x.dtype, device=x.device)
    return float(torch.linalg.matrix_norm(x.T @ (x @ p) - p)) / probes**0.5


def _complement_projector(x: torch.Tensor) -> torch.Tensor:
    """``I - Q Q^T`` for ``Q`` an orthonormal basis of the columns of ``x`` (``(..., m, r)``, r < m)."""
    q = torch.linalg.qr(x).Q
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return eye - q @ q.transpose(-2, -1)


def iter_procrustes(
    w0: torch.Tensor,
    targets: Iterable[torch.Tensor],
    *,
    solver: str = "auto",
    rtol: float = RANK_RTOL,
    tol: float | None = None,
    max_iter: int = 60,
) -> Iterator[tuple[Rotation, ProcrustesInfo]]:
    """Closest-to-identity ``P_i`` in SO(in) minimising ``||T_i - W0 @ P_i||_F``, one target at a time.

    ``w0`` and each target are ``(out, in)`` in the same dtype (use fp64). Work shared by all
    targets (the QR of ``W0^T``) is done once; only one target's basis is alive at a time. No
    shortcut for ``T_i = W0``: the formula itself returns ``P = I`` there (to rounding).
    """
    solver = resolve_solver(check_solver(solver), w0.device)
    out, n = w0.shape
    reduced = 2 * out < n
    if reduced:
        # B_i = [Q0, Q_i] = F blockdiag(I, G_i) with the frame F = [Q0, Q0c] (one complete QR of
        # W0^T shared by all tasks): Q0 spans the rows of W0, Q_i the part of the rows of T_i
        # outside it; then W0 = a B_i^T with a = [R0^T, 0] and T_i = b_i B_i^T exactly.
        frame, r0 = Frame.of(w0)
    for target in targets:
        tt = target.T
        rot = Rotation(n)
        if reduced:
            # G_i from a QR inside the complement of Q0, so Q_i stays orthogonal to Q0 even where
            # T_i adds nothing to the rows of W0 (LoRA updates of rank < out, T_i ~ W0)
            tf = frame.right(target)  # T_i F = [T_i Q0, T_i Q0c], one product
            # Q0c^T T_i^T (n - out, out) is a column-major view, as LAPACK wants it;
            # Q_i^T T_i^T = G^T Q0c^T T_i^T = R_i
            g, ri = torch.linalg.qr(tf[:, out:].T)
            bt = torch.cat([tf[:, :out].T, ri], dim=0)  # b_i^T, (2 out, out)
            del ri, tf
            rot.frame, rot.coeff, rot.base_coords, rot.target_coords = frame, g, r0.T, bt
            a = None
        else:
            a, bt = w0, tt
        del tt, target  # not held across the yield (bt may still view it)
        size = bt.shape[0]
        info = ProcrustesInfo(solver, 0.0)
        if solver != "svd":
            if a is None:
                a = torch.cat([r0.T, torch.zeros(out, out, dtype=w0.dtype, device=w0.device)], dim=-1)
            m = a.T @ bt.T
            amat = m
            if out < size:
                scale = torch.linalg.matrix_norm(m) / min(out, size) ** 0.5
                amat = m + scale * (_complement_projector(a.T) @ _complement_projector(bt))
            x, err, info.iterations = newton_schulz(amat, tol=tol, max_iter=max_iter)
            del amat
            limit = default_tol(m.dtype, size) if tol is None else tol
            if float(err) <= limit and float(torch.linalg.det(x)) > 0:
                rot.core = x
            else:
                info.fallback = 1
        if rot.core is None and reduced:
            rot.factors = _reduced_closest_polar_svd(r0, bt, rtol)
        if rot.core is None and rot.factors is None:
            if a is None:
                a = torch.cat([r0.T, torch.zeros(out, out, dtype=w0.dtype, device=w0.device)], dim=-1)
            rot.core = _thin_closest_polar_svd(a, bt.T, rtol) if out < size else None
            if rot.core is None:
                rot.core = _closest_polar_svd(a.T @ bt.T, rtol)
        info.orthogonality_error = _orthogonality_error(rot)
        del bt, a
        yield rot, info


def _orthogonality_error(rot: Rotation) -> float:
    """``||C^T C - I||_F`` of the core; for a factored core ``C = blockdiag(P_c, Z) Y^T`` (SVD
    products, a Newton-Schulz factor certified on its own, a Householder product: all orthogonal
    to rounding) the bound ``||D^T D - I||_F + ||Y^T Y - I||_F``, each term estimated from 8
    random probes (`_probe_orthogonality_error`) instead of ``m x m`` products."""
    if rot.factors is None:
        c = rot.core
        return float(orthogonality_errors(c)) if c.shape[-1] else 0.0
    pc, z, y = rot.factors
    err_d = (_probe_orthogonality_error(pc) ** 2 + _probe_orthogonality_error(z) ** 2) ** 0.5
    return err_d + _probe_orthogonality_error(y)


def procrustes_batch(
    w0: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any
) -> tuple[list[Rotation], ProcrustesInfo]:
    """All of `iter_procrustes` at once; the info aggregates (max error, total fallbacks)."""
    rotations, total = [], None
    for rot, info in iter_procrustes(w0, targets, **kwargs):
        rotations.append(rot)
        total = info if total is None else _combine(total, info)
    return rotations, total or ProcrustesInfo(resolve_solver(kwargs.get("solver", "auto"), w0.device), 0.0)


def _combine(a: ProcrustesInfo, b: ProcrustesInfo) -> ProcrustesInfo:
    return ProcrustesInfo(
        a.solver,
        max(a.orthogonality_error, b.orthogonality_error),
        max(a.iterations, b.iterations),
        a.fallback + b.fallback,
    )


def procrustes_rotation(
    w0: torch.Tensor, w_target: torch.Tensor, *, solver: str = "auto", rtol: float = RANK_RTOL
) -> torch.Tensor:
    """Dense orthogonal ``P`` (``in x in``, det +1) minimising ``||w_target - w0 @ P||_F``, closest to I.

    Computed in float64; ``w_target == w0`` gives exactly the identity.
    """
    _check_pair(w0, w_target)
    w0d = w0.to(torch.float64)
    wt = w_target.to(device=w0.device, dtype=torch.float64)
    if torch.equal(w0d, wt):
        return torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device)
    rots, _ = procrustes_batch(w0d, wt[None], solver=solver, rtol=rtol)
    return rots[0].dense()


def _check_pair(w0: torch.Tensor, w: torch.Tensor, name: str | None = None) -> None:
    if w0.dim() != 2 or tuple(w.shape) != tuple(w0.shape):
        raise IncompatibleInputsError(
            f"shape mismatch: base {tuple(w0.shape)} vs expert {tuple(w.shape)}; decoupling needs equal 2-D shapes",
            tensor=name,
        )


# -- Cayley maps ---------------------------------------------------------------------------------


def inverse_cayley(
    p: torch.Tensor,
    *,
    name: str | None = None,
    limit: float = CAYLEY_LIMIT,
    right: torch.Tensor | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """``Q = (P - I)(P + I)^-1`` made exactly skew; `NumericalError` (naming ``name``) when ``P``
    has an eigenvalue at or within about ``2/limit`` of -1.

    With ``right`` ``Y`` (orthogonal), ``P = p @ Y^T`` is given factored:
    ``(P + I)^-1 = Y (p + Y)^-1``, so ``Q = I - 2 X`` with ``X (p + Y) = Y`` (one LU, no ``P``) and
    its skew part is ``X^T - X`` (the identity cancels). ``overwrite=True`` lets it reuse ``p``'s
    memory (the caller's own temporary; best column-major) for ``p + Y`` and its LU factors.
    """
    n = p.shape[-1]
    if right is None:
        eye = torch.eye(n, dtype=p.dtype, device=p.device)
        q, status = torch.linalg.solve_ex(p + eye, p - eye, left=False)
        skew = 0.5 * (q - q.transpose(-2, -1)) if int(status.max() if status.numel() else 0) == 0 else None
    else:
        a = p.add_(right) if overwrite else p + right
        del p
        if a.mT.is_contiguous():  # column-major, LAPACK's layout: factored in place, no second matrix
            piv = torch.empty(n, dtype=torch.int32, device=a.device)
            lu, piv, status = torch.linalg.lu_factor_ex(
                a, out=(a, piv, torch.empty((), dtype=torch.int32, device=a.device))
            )
        else:
            lu, piv, status = torch.linalg.lu_factor_ex(a)
        del a
        skew = None
        if int(status.max() if status.numel() else 0) == 0:
            x = torch.linalg.lu_solve(lu, piv, right, left=False)
            del lu
            skew = _skew_part_in_place(x.contiguous())
    if skew is None or not (float(torch.linalg.matrix_norm(skew)) if n else 0.0) < limit:
        raise NumericalError(
            "orthogonal factor has an eigenvalue at -1 (a half turn); the inverse Cayley map is undefined",
            tensor=name,
            hint="The expert is too far from the base for rotation merging; use target=None (plain Euclidean) for it, or exclude this tensor.",
        )
    return skew


def _skew_part_in_place(x: torch.Tensor, panel: int = 256) -> torch.Tensor:
    """``x <- x^T - x`` for a square contiguous ``x``, by panels of rows: no second full-size matrix."""
    n = x.shape[-1]
    for i in range(0, n, panel):
        j = min(n, i + panel)
        d = x[i:j, i:].T - x[i:, i:j]  # rows i:j of the result are -(this)^T; columns i:j are this
        x[i:, i:j] = d
        x[i:j, i:] = d.T.neg()
    return x


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``P = (I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I`` (orthogonal for skew ``Q``, defined for every skew
    ``Q``: ``I - Q`` has singular values >= 1). Written to hold few ``in x in`` matrices at once."""
    a = q.neg()
    a.diagonal(dim1=-2, dim2=-1).add_(1)
    p = torch.linalg.inv(a)
    del a
    p.mul_(2).diagonal(dim1=-2, dim2=-1).sub_(1)
    return p


def cayley_apply(w: torch.Tensor, skew: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``w @ cayley(scale * skew)`` = ``2 w (I - scale S)^-1 - w`` by one LU solve, without forming the
    rotation or an inverse. ``skew`` is overwritten (it becomes ``I - scale S``)."""
    a = skew.mul_(-scale)
    a.diagonal(dim1=-2, dim2=-1).add_(1)
    x = torch.linalg.solve(a, w, left=False)  # x (I - Q) = w
    return x.mul_(2).sub_(w)


def cayley_apply_leading(a: torch.Tensor, skew: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[A, 0] @ cayley(scale * S)`` for ``A`` ``(r, k)`` and ``S`` ``(n, n)`` skew: `cayley_apply`
    of a matrix whose last ``n - k`` columns are zero, by blocks (about two thirds of its flops).

    With ``M = I - scale S`` only the first ``k`` rows of ``M^-1`` matter:
    ``M^-1[:k] = Sc^-1 [I, -W]``, ``W = M12 M22^-1``, ``Sc = M11 - W M21`` (LU of ``M22`` and of
    ``Sc``; both are well conditioned: principal blocks and Schur complements of ``I - skew`` have
    singular values >= 1). ``skew`` is overwritten (it becomes ``M``)."""
    k = a.shape[-1]
    m = skew.mul_(-scale)
    m.diagonal(dim1=-2, dim2=-1).add_(1)
    w = torch.linalg.solve(m[k:, k:], m[:k, k:], left=False)  # W M22 = M12
    sc = torch.addmm(m[:k, :k], w, m[k:, :k], alpha=-1)
    x = torch.linalg.solve(sc, a, left=False)  # A Sc^-1
    out = torch.cat([x, x @ w], dim=-1).mul_(2)  # 2 [A, 0] M^-1 (second block negated below)
    out[:, k:].neg_()
    out[:, :k].sub_(a)
    return out


def _magnitude_factor(skew_sum: torch.Tensor | None, total: float) -> float | None:
    """``c = (sum_i w_i ||Q_i||) / ||S||`` for ``S = sum_i w_i Q_i``; ``None`` when ``S = 0`` (no rotation)."""
    if skew_sum is None or total == 0.0:
        return None
    s_norm = float(torch.linalg.matrix_norm(skew_sum))
    return None if s_norm <= ZERO_RTOL * total else total / s_norm


# -- targets -------------------------------------------------------------------------------------


def conflict_rows(task_vector: torch.Tensor, mean: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Rows (``dim=1`` cosine) of one ``tau_i`` (``(out, in)``) pointing against the weighted mean
    task vector ``mean = sum_j w_j tau_j``: a bool ``(out,)`` mask, True where cosine < 0.
    A zero row has cosine 0 and is not kept. Computed by blocks of ``rows`` rows (the cosine's
    temporaries are block-sized)."""
    cos = torch.nn.functional.cosine_similarity
    return torch.cat(
        [cos(task_vector[r : r + rows], mean[r : r + rows], dim=1) < 0 for r in range(0, task_vector.shape[0], rows)]
    )


# -- one weight ----------------------------------------------------------------------------------


@dataclass
class _SkewSum:
    """``S = sum_i w_i Q_i`` and ``sum_i w_i ||Q_i||_F``, one rotation at a time. With a shared
    frame (reduced basis) ``S`` is kept in frame coordinates, so no task costs an ``in x in``
    product; ``base_coords`` ``A`` then gives ``W0 @ F = [A, 0]``."""

    skew: torch.Tensor | None = None
    frame: Frame | None = None
    base_coords: torch.Tensor | None = None
    total: float = 0.0
    infos: list[ProcrustesInfo] = field(default_factory=list)

    def add(self, rot: Rotation, info: ProcrustesInfo, weight: float, base: torch.Tensor, name: str | None) -> float:
        """Adds ``weight * Q`` of ``rot``; returns ``||Q||_F``."""
        self.infos.append(info)
        qc = rot.skew_core(name)
        norm = float(torch.linalg.matrix_norm(qc))  # = ||Q_i||_F: B has orthonormal columns
        self.total += weight * norm
        if rot.frame is not None:
            if self.skew is None:
                self.frame, self.base_coords = rot.frame, rot.base_coords
                self.skew = base.new_zeros(base.shape[1], base.shape[1])
            rot.add_skew_in_frame(self.skew, qc, weight)
        elif self.skew is None:
            self.skew = weight * qc
        else:
            self.skew.add_(qc, alpha=weight)
        return norm


def _diff_norm(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> float:
    """``||a - b||_F`` of two ``(out, in)`` matrices, by blocks of rows (no full-size temporary)."""
    squares = sum(
        float(torch.linalg.vector_norm(a[r : r + rows] - b[r : r + rows])) ** 2 for r in range(0, a.shape[0], rows)
    )
    return squares**0.5


def _merged_stats(stats: DecoupleStats, skew: _SkewSum) -> float | None:
    """Fills the solver and merged-rotation fields of ``stats``; returns the magnitude factor ``c``
    (``None``: no rotation)."""
    if skew.infos:
        stats.solver = skew.infos[0].solver
        stats.solver_error = max(x.orthogonality_error for x in skew.infos)
        stats.solver_fallback = sum(x.fallback for x in skew.infos)
    else:
        stats.solver = "identity"
    c = _magnitude_factor(skew.skew, skew.total)
    stats.magnitude_factor = c
    if c is not None:
        stats.merged_skew_norm = skew.total  # the merged Q = c S has ||Q||_F = sum_i w_i ||Q_i||_F by construction
    return c


def _norm64(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _solver_feed(
    base: torch.Tensor, solver: str, rtol: float
) -> tuple[list[torch.Tensor], Iterator[tuple[Rotation, ProcrustesInfo]]]:
    """`iter_procrustes` fed on demand: append one target to the list, then ``next()`` the iterator
    for its rotation (only that target is alive; the shared QR of ``W0^T`` is made once)."""
    pending: list[torch.Tensor] = []

    def next_target() -> Iterator[torch.Tensor]:
        while pending:
            yield pending.pop()

    return pending, iter_procrustes(base, next_target(), solver=solver, rtol=rtol)


def _conflict_target(
    f: torch.Tensor, base: torch.Tensor, mean: torch.Tensor, stats: DecoupleStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conflict target ``W0 + tau_i * mask_i`` of the expert ``f`` and its row mask (rows of
    ``tau_i`` against the weighted mean task vector ``mean``); records the rows kept in ``stats``."""
    t = f - base
    keep = conflict_rows(t, mean)
    stats.rows_kept.append(int(keep.sum()))
    return t.mul_(keep[:, None]).add_(base), keep  # in place


def _merge_ta_reduced(
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
    """Task arithmetic (``rho = sum_i c_i rho_i``) in the reduced basis (``2 out < in``), no residual formed.

    ``W0 P + sum_i c_i (W_i - W0 P_i) = (W0 P F + E) F^T`` with ``E = sum_i c_i rho_i F`` summed in
    frame coordinates: with ``W0 P_i = X_i B_i^T``, ``X_i = A C_i[:out]`` (``A = R0^T``,
    ``W0 B_i = [A, 0]``), ``B_i = F blockdiag(I, G_i)`` and the target ``T_i = b_i B_i^T``, the
    residual is ``rho_i = r_i B_i^T + U_i`` with ``r_i = b_i - X_i`` and ``U_i = W_i - T_i`` (zero for
    the global target; the conflict target's rows left at ``W0``), so
    ``rho_i F = [r_i1, r_i2 G_i^T] + U_i F``: per task two ``out x out``-sized products and one
    ``out x out x (in - out)``, no ``(out, in) x (in, in)``; one ``(out, in)`` accumulator.
    The report's norms come from the same small matrices (``B_i`` has orthonormal columns):
    ``||W0 (P_i - I)|| = ||X_i - [A, 0]||``, ``||rho_i||^2 = ||r_i||^2 + 2 <r_i, U_i B_i> + ||U_i||^2``.
    Norms are summed in float64.
    """
    out, n = base.shape
    pending, solved = _solver_feed(base, solver, rtol)
    skew = _SkewSum()
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
            t, keep = _conflict_target(f, base, mean, stats)
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
        a, g = rot.base_coords, rot.coeff
        x = rot.base_core_rows()  # W0 P_i = X B^T
        r = rot.target_coords.T - x  # T_i - W0 P_i = r B^T
        x[:, :out].sub_(a)  # W0 (P_i - I) = X B^T
        stats.orth_part_norms[i] = _norm64(x)
        del x
        if acc is None:
            acc = base.new_zeros(out, n)
        acc[:, :out].add_(r[:, :out], alpha=coeffs[i])
        acc[:, out:].addmm_(r[:, out:], g.T, alpha=coeffs[i])
        rho2 = _norm64(r) ** 2
        if drop is not None:  # rows of W_i the conflict target left at W0: U_i = tau_i there
            u = f[drop] - base[drop]
            uf = rot.frame.right(u)
            acc[drop] += coeffs[i] * uf
            ub = torch.cat([uf[:, :out], uf[:, out:] @ g], dim=-1)
            del uf
            cross = float(torch.sum(r[drop].to(torch.float64) * ub.to(torch.float64)))
            rho2 = max(rho2 + 2 * cross + _norm64(u) ** 2, 0.0)
            del u, ub
        stats.residual_norms[i] = rho2**0.5
        del rot, r, f
    solved.close()  # drops the shared QR of W0^T
    c = _merged_stats(stats, skew)
    if acc is None:  # every target was the base
        merged = base.clone()
    elif c is None:  # the rotations cancel: W0 + E F^T
        merged = skew.frame.right_t(acc).add_(base)
    else:
        # W0 @ P = (W0 F) cayley(c S_F) F^T with S_F the skew sum in frame coordinates
        rotated = cayley_apply_leading(skew.base_coords, skew.skew, c)
        skew.skew = skew.base_coords = None
        merged = skew.frame.right_t(rotated.add_(acc))
    return (merged if plain is None else merged.add_(plain)), stats


def decouple_merge(
    w0: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    target: str | None = "global",
    residual: str = "ta",
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    *,
    generator: torch.Generator | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float = RANK_RTOL,
) -> tuple[torch.Tensor, DecoupleStats]:
    """Merge the expert weights ``experts`` (full weights ``W_i``, torch layout) of one 2-D tensor.

    ``weights`` must be normalised (sum 1). Returns ``(merged weight in dtype, stats)``. An expert
    equal to the base (zero task vector, e.g. a module an adapter does not touch) contributes
    ``P_i = I``, ``Q_i = 0``, ``rho_i = 0``. See the module docstring for the formulas.

    Memory: ``experts`` may stay in their storage dtype; each is converted to ``dtype`` when its
    turn comes and dropped after. The residuals are produced one at a time and handed to the
    Euclidean method through `registry.merge_iter`: a linear method (``ta``, ``dare_ta``) keeps a
    running sum, so only the base, the accumulator and one expert's temporaries are alive in
    ``dtype``; any other method gets the residuals as a list.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: 'global', 'conflict', None")
    check_solver(solver)
    if len(experts) != len(weights) or not experts:
        raise ConfigError(f"got {len(weights)} weights for {len(experts)} experts")
    for e in experts:
        _check_pair(w0, e, name)
    # rows path dispatch: task arithmetic on a weight with 2 out >= in goes through the Gram path
    if target is not None and residual == "ta" and 2 * w0.shape[0] >= w0.shape[1]:
        from .decouple_rows import decouple_merge_ta_rows

        return decouple_merge_ta_rows(
            w0, experts, weights, target, residual_kwargs, solver, name=name, dtype=dtype, rtol=rtol
        )
    # end of rows path dispatch
    merge_fn = get_euclidean(residual)
    kwargs = dict(residual_kwargs or {})
    weights = list(weights)
    base = w0.to(dtype)

    def full(i: int) -> torch.Tensor:
        return experts[i].to(device=base.device, dtype=dtype)

    # task arithmetic in the reduced basis never forms a residual (`_merge_ta_reduced`)
    fast_ta = target is not None and residual == "ta" and 2 * base.shape[0] < base.shape[1] and set(kwargs) <= {"lam"}
    if fast_ta:
        coeffs = ta_coefficients(weights, kwargs.get("lam"))  # merged residual = sum_i c_i rho_i

    # first pass, one expert at a time and before any work: finiteness, ||tau_i||, for the
    # conflict target the weighted mean task vector
    stats = DecoupleStats()
    mean = base.new_zeros(base.shape) if target == "conflict" else None
    finite = bool(torch.isfinite(base).all())
    for i in range(len(experts)):
        if not finite:
            break
        f = full(i)
        finite = bool(torch.isfinite(f).all())
        tau = f - base
        del f
        stats.task_vector_norms.append(float(torch.linalg.matrix_norm(tau)))
        if mean is not None:
            mean.add_(weights[i] * tau)
        del tau
    if not finite:
        raise NumericalError("base or expert weight contains NaN or Inf", tensor=name)
    if fast_ta:
        return _merge_ta_reduced(base, full, weights, coeffs, target, mean, stats, solver, rtol, name)
    if target is None:
        task_vectors = (full(i) - base for i in range(len(experts)))
        merged_tau = merge_iter(merge_fn, task_vectors, weights, base=base, generator=generator, **kwargs)
        stats.residual_norms = list(stats.task_vector_norms)
        stats.solver = "none"
        return base + merged_tau.to(dtype), stats

    # Procrustes solves one target at a time, when the residual stream below asks for it
    pending, solved = _solver_feed(base, solver, rtol)
    skew = _SkewSum()
    stats.skew_norms = [0.0] * len(experts)
    stats.orth_part_norms = [0.0] * len(experts)

    def residuals() -> Iterator[torch.Tensor]:
        """``rho_i = W_i - W0 @ P_i`` in expert order (``rho_i = tau_i`` where the target is the
        base: ``P_i = I``); one expert's rotation, basis and full weight are alive at a time."""
        for i in range(len(experts)):
            f = full(i)
            if target == "global":
                t = f
            else:
                t, _ = _conflict_target(f, base, mean, stats)
            if torch.equal(t, base):
                del t
                rho = f - base
            else:
                pending.append(t)
                del t  # iter_procrustes drops it before yielding
                rot, info = next(solved)
                stats.skew_norms[i] = skew.add(rot, info, weights[i], base, name)
                rho = rot.rotate_base(base)
                del rot
                stats.orth_part_norms[i] = _diff_norm(rho, base)
                rho.neg_().add_(f)  # W_i - W0 @ P_i, in place (the same rounding as f - rotated)
            del f
            stats.residual_norms.append(float(torch.linalg.matrix_norm(rho)))
            yield rho
            del rho

    rho = merge_iter(merge_fn, residuals(), weights, base=base, generator=generator, **kwargs).to(dtype)
    solved.close()  # drops the shared QR of W0^T
    mean = None
    c = _merged_stats(stats, skew)
    if c is None:
        return base + rho, stats
    if skew.frame is None:
        return cayley_apply(base, skew.skew, c).add_(rho), stats
    # W0 @ P = (W0 F) cayley(c S_F) F^T with S_F the skew sum in frame coordinates
    rotated = cayley_apply_leading(skew.base_coords, skew.skew, c)
    skew.skew = skew.base_coords = None
    out = skew.frame.right_t(rotated)
    del rotated
    return out.add_(rho), stats
