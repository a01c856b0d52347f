"""Compact orthogonal matrices of the decoupling path: the Householder `Frame` and the `Rotation` ``P = I + B (C - I) B^T``.

Conventions: torch layout, ``W`` is ``(out, in)``; a rotation ``P`` (``in x in``) acts on the input
side, ``W0 @ P`` (the paper's ``R W0`` with ``R = P^T``). The frame ``F`` of the base comes from one
complete QR ``W0^T = F [R0; 0]``; its first ``out`` columns span the rows of ``W0``. Skew parts use
the canonical sign convention ``Q = (P - I)(P + I)^-1`` (`cayley`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cayley import inverse_cayley_lu
from .orthogonality import probe_orthogonality_error


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
        """The frame of ``w0`` (``(out, in)``, ``2 out <= in``) and ``R0`` (``(out, out)``, upper triangular)."""
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
            return inverse_cayley_lu(self.core, name=name)
        pc, z, y = self.factors
        # built column-major, the layout of Y (a Householder product) and of LAPACK's LU
        return inverse_cayley_lu(torch.block_diag(pc.T, z.T).T, name=name, right=y, overwrite=True)

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

    def orthogonality_bound(self) -> float:
        """``||C^T C - I||_F`` of the core, estimated from 8 random probes
        (`orthogonality.probe_orthogonality_error`) instead of an ``m x m`` product: every core is
        orthogonal to rounding or certified by its solver before it gets here (SVD products,
        an eigh or Newton-Schulz factor whose own orthogonality error was checked, a Householder
        product). For a factored core ``C = blockdiag(P_c, Z) Y^T`` the bound
        ``||D^T D - I||_F + ||Y^T Y - I||_F``, each term so estimated."""
        if self.factors is None:
            c = self.core
            return probe_orthogonality_error(c) if c.shape[-1] else 0.0
        pc, z, y = self.factors
        err_d = (probe_orthogonality_error(pc) ** 2 + probe_orthogonality_error(z) ** 2) ** 0.5
        return err_d + probe_orthogonality_error(y)
