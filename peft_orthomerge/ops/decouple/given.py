"""Rotations an expert brings with it (an OFT adapter's blocks), in the decoupling convention.

Conventions: torch layout, ``W`` is ``(out, in)``; an expert is decoupled as ``W_i ~ W0 @ P_i``
with ``P_i`` (``in x in``) on the input side and generator ``Q_i = (P_i - I)(P_i + I)^-1``
(canonical, `cayley`). An OFT adapter stores canonical skew blocks ``Q_k`` (`skew`) whose exact
rotations are ``R_k = cayley(Q_k) = (I + Q_k)(I - Q_k)^-1``; PEFT applies them as
``W0 @ blockdiag(R)^T`` to a Linear / Conv weight and as ``E @ blockdiag(R)`` to an embedding
(DESIGN sections 1 and 6). So

- Linear: ``P_i = blockdiag(R)^T = cayley(-blockdiag(Q))``, generator ``-blockdiag(Q)``;
- embedding: ``P_i = blockdiag(R) = cayley(blockdiag(Q))``, generator ``+blockdiag(Q)``.

The rotation is exact (no Procrustes fit, no round trip through ``P``); a Cayley-Neumann adapter
is given the exact Cayley rotation its truncated series approximates, and the difference between
the weight it applies and ``W0 @ P_i`` is left to its residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_lift import dense_block_diagonal
from ..cayley import cayley
from ..oft_fold import fold_weight


@dataclass(frozen=True)
class BlockRotation:
    """The exact rotation ``P`` of one OFT module (module docstring): canonical skew ``blocks``
    ``(r, b, b)`` (``r = 1``: one shared block) and ``embedding`` (``P = blockdiag(R)``; otherwise
    ``P = blockdiag(R)^T``)."""

    blocks: torch.Tensor
    embedding: bool = False

    def generator(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """Dense ``Q = (P - I)(P + I)^-1`` (``size x size``, block-diagonal), in ``like``'s dtype and device."""
        q = dense_block_diagonal(self.blocks.to(device=like.device, dtype=like.dtype), size)
        return q if self.embedding else q.neg_()

    def rotate_base(self, w0: torch.Tensor) -> torch.Tensor:
        """``W0 @ P`` block by block (`oft_fold.fold_weight`, cost ``out * in * b``), in ``w0``'s dtype."""
        rotation = cayley(self.blocks.to(device=w0.device), dtype=w0.dtype)
        return fold_weight(w0, rotation, "embedding" if self.embedding else "linear")
