"""The Cayley maps between skew-symmetric ``Q`` and orthogonal ``R``, in one sign convention.

**Convention.** Every map here is the canonical Cayley map of this library (see `skew`) and its inverse:

    R = cayley(Q) = (I + Q)(I - Q)^-1,        Q = inverse_cayley(R) = (R - I)(R + I)^-1

(PEFT's ``use_cayley_neumann=False`` branch builds ``(I - Q)(I + Q)^-1 = cayley(-Q)``: callers flip
the sign with `skew.to_canonical` before they get here.) Rotations act on the input side in torch
layout: a weight ``W`` ``(out, in)`` becomes ``W @ R`` (PEFT's OFT: ``W @ blockdiag(R)^T``).

Two families, named by what they work on:

- batches of small OFT blocks ``(r, b, b)``: `cayley` and `inverse_cayley`
  (float64 unless ``dtype``; dense solves).
- one large ``in x in`` matrix of the decoupling path (`decouple`): `inverse_cayley_lu` (LU in
  place, optionally with ``P`` given factored, `NumericalError` naming the tensor), `cayley_apply`
  (``W @ cayley(c S)`` by one LU solve, no rotation formed) and `cayley_apply_leading` (the same
  for ``[A, 0]``, by blocks).
"""

from __future__ import annotations

import torch

from ..errors import NumericalError

CAYLEY_LIMIT = 1e6  # ||Q||_F above this: P has an eigenvalue within ~2e-6 of -1


# -- batches of small blocks (OFT) -----------------------------------------------------------------


def cayley(q: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact canonical Cayley map ``R = (I + Q)(I - Q)^-1`` of a batch of skew blocks ``(r, b, b)``
    (defined for every skew ``Q``), in ``dtype``."""
    q = q.to(dtype)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def inverse_cayley(r: torch.Tensor, *, tol: float = 1e-10) -> torch.Tensor:
    """Canonical ``Q = (R - I)(R + I)^-1`` of a batch of blocks ``(r, b, b)``, in float64;
    `NumericalError` where ``R`` has eigenvalue -1.

    The result is skew-symmetrised (exactly skew for orthogonal ``R``; the projection only
    removes rounding noise).
    """
    r = r.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    plus = r + eye
    smallest = torch.linalg.svdvals(plus)[..., -1]
    if bool((smallest <= tol).any()):
        bad = int(torch.argmin(smallest))
        raise NumericalError(
            f"inverse Cayley map undefined: rotation block {bad} has an eigenvalue at -1 "
            f"(smallest singular value of R + I: {float(smallest[bad]):.2e})",
            hint="The rotations are too far apart (a half turn); merge in so(b) instead (method='orthomerge').",
        )
    q = torch.linalg.solve(plus, r - eye, left=False)
    return 0.5 * (q - q.transpose(-2, -1))


# -- one large matrix (decoupling) -----------------------------------------------------------------


def _lu_in_place(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LU factors of square ``a``; column-major ``a`` (LAPACK's layout) is factored in place, no second matrix."""
    if a.mT.is_contiguous():
        piv = torch.empty(a.shape[-1], dtype=torch.int32, device=a.device)
        return torch.linalg.lu_factor_ex(a, out=(a, piv, torch.empty((), dtype=torch.int32, device=a.device)))
    return torch.linalg.lu_factor_ex(a)


def inverse_cayley_lu(
    p: torch.Tensor,
    *,
    name: str | None = None,
    limit: float = CAYLEY_LIMIT,
    right: torch.Tensor | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """``Q = (P - I)(P + I)^-1`` of one large ``in x in`` ``P``, made exactly skew; `NumericalError`
    (naming ``name``) when ``P`` has an eigenvalue at or within about ``2/limit`` of -1.

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
        lu, piv, status = _lu_in_place(a)
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
