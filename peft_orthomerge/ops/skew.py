"""Skew-symmetric OFT blocks: PEFT's vector layout, its two sign conventions, and the rotations PEFT builds.

Layout (PEFT >= 0.16): a module's OFT parameter is a tensor of shape ``(r, n)`` with
``n = b(b-1)/2``; row ``k`` holds the strict upper triangle of block ``k`` in the order of
``torch.triu_indices(b, b, 1)``, and the skew block is ``Q = U - U^T`` (no factor 1/2).

**Canonical convention of this library.** Every skew block handled by the merge code is
*canonical*: it describes the rotation

    R = Cayley(Q) = (I + Q)(I - Q)^-1        (exactly orthogonal for skew Q)

PEFT stores vectors in two opposite conventions, depending on ``use_cayley_neumann``:

- ``True``: PEFT builds ``R = I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)``, a truncation of the
  canonical Cayley map. The stored vector *is* canonical.
- ``False``: PEFT builds ``R = (I - Q)(I + Q)^-1 = Cayley(-Q)``. The stored vector is the
  *negated* canonical vector; `to_canonical` / `from_canonical` flip it on the way in and out.

PEFT applies ``R`` to the input: per block ``x_blk -> x_blk @ R_k``, so a Linear weight ``W``
of shape ``(out, in)`` becomes ``W @ blockdiag(R)^T``.

The exact Cayley pair itself lives in `cayley`; `peft_rotation` picks it or the Neumann series
the way PEFT does. All functions are batched over blocks (leading dimension ``r``). The rotation maps compute in
float64 unless given ``dtype``; the vector helpers (`to_canonical`, `block_norms`) keep float32 where
the caller asks for it (a sign flip and a norm lose nothing there).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .cayley import cayley


def block_size_from_n(n: int) -> int:
    """Return ``b`` with ``n = b(b-1)/2``; `InputError` if ``n`` is not a triangular number."""
    b = round((1 + math.sqrt(1 + 8 * n)) / 2)
    if n < 1 or b * (b - 1) // 2 != n:
        raise InputError(f"OFT vector length {n} is not b(b-1)/2 for any block size b")
    return b


def vec_to_skew(vec: torch.Tensor, b: int | None = None, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(r, n)`` vectors -> ``(r, b, b)`` skew blocks ``Q = U - U^T`` (float64 unless ``dtype``)."""
    b = block_size_from_n(vec.shape[-1]) if b is None else b
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = torch.zeros(vec.shape[0], b, b, dtype=dtype, device=vec.device)
    q[:, rows, cols] = vec.to(dtype)
    return q - q.transpose(-2, -1)


def skew_to_vec(q: torch.Tensor) -> torch.Tensor:
    """``(r, b, b)`` skew blocks -> ``(r, n)`` strict upper triangles (``triu_indices`` order)."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[:, rows, cols]


def block_norms(vec: torch.Tensor) -> torch.Tensor:
    """Per-block Frobenius norms ``||Q_k||_F = sqrt(2) ||vec_k||`` of ``(r, n)`` vectors, as float64 ``(r,)``;
    of a stack ``(N, r, n)`` (N modules' or tasks' vectors), ``(N, r)``, each ``[i]`` equal bit for bit
    to ``block_norms(vec[i])``.

    One pass in the vector's dtype (float32 row norms are exact to a few float32 ulps; half
    precisions are widened to float32 first); where a float32 sum of squares overflows, the norms
    of that ``(r, n)`` tensor are recomputed in float64. NaN / Inf entries give a non-finite norm
    for their block.
    """
    if vec.dtype not in (torch.float32, torch.float64):
        vec = vec.float()
    norms = torch.linalg.vector_norm(vec, dim=-1)
    if vec.dtype != torch.float64 and norms.numel() and not math.isfinite(float(norms.max())):  # max keeps NaN
        if vec.dim() > 2:
            return torch.stack([block_norms(v) for v in vec])
        norms = torch.linalg.vector_norm(vec, dim=-1, dtype=torch.float64)
    return math.sqrt(2.0) * norms.to(torch.float64)


def to_canonical(vec: torch.Tensor, use_cayley_neumann: bool, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A stored PEFT vector -> canonical vector in ``dtype`` (negated for the exact-Cayley flag)."""
    vec = vec.to(dtype)
    return vec if use_cayley_neumann else -vec


def from_canonical(vec: torch.Tensor, use_cayley_neumann: bool) -> torch.Tensor:
    """A canonical vector -> the vector PEFT must store under ``use_cayley_neumann``."""
    return vec if use_cayley_neumann else -vec


def neumann_rotation(q: torch.Tensor, terms: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PEFT's Cayley-Neumann map (>= 0.18) of canonical blocks ``q``, term for term as PEFT computes it.

    ``terms`` = ``num_cayley_neumann_terms`` = t: ``I`` (t = 1), ``I + 2Q`` (t = 2), and for
    t >= 3 ``I + 2(Q + ... + Q^m) + Q^(m+1)`` with ``m = max(2, t - 2)``, accumulated in place in
    PEFT's order (``R.add_(Q^k, alpha=2)``).
    """
    q = q.to(dtype)
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = q @ q
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = power @ q
                r.add_(power, alpha=2.0)
            r.add_(power @ q)
    return r


def peft_rotation(
    q: torch.Tensor, use_cayley_neumann: bool, terms: int = 5, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The rotation PEFT builds for canonical blocks ``q`` stored under the given flag (in ``dtype``)."""
    return neumann_rotation(q, terms, dtype=dtype) if use_cayley_neumann else cayley(q, dtype=dtype)
