"""Lifting OFT skew blocks to a multiple of their block size, exactly.

A block-diagonal generator is also block-diagonal at any multiple of its block size: ``k = B/b``
consecutive ``b x b`` blocks ``Q_{kj}, ..., Q_{kj+k-1}`` form the ``B x B`` block
``blockdiag(Q_{kj}, ..., Q_{kj+k-1})``. PEFT's exact Cayley map and its Neumann polynomial both
act block by block and preserve block-diagonal structure, so the lifted adapter applies exactly
the rotation of the original. Vectors are PEFT's layout: per block the strict upper triangle in
``torch.triu_indices(B, B, 1)`` order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .skew import skew_to_vec, vec_to_skew


def common_block_size(sizes: Iterable[int]) -> int:
    """The smallest block size that is a multiple of every one of ``sizes``."""
    return math.lcm(*sizes)


def lift_blocks(vec: torch.Tensor, b: int, target: int) -> torch.Tensor:
    """``(r, b(b-1)/2)`` vectors of ``b x b`` blocks -> ``(r*b/target, target(target-1)/2)``
    vectors of the ``target x target`` blocks holding them on the diagonal (``target`` a multiple
    of ``b``, ``r*b`` a multiple of ``target``); same dtype and device."""
    if target == b:
        return vec
    k = target // b
    if target % b or vec.shape[0] % k:
        raise ValueError(f"cannot lift {vec.shape[0]} blocks of size {b} to blocks of size {target}")
    q = vec_to_skew(vec, b, dtype=vec.dtype).reshape(vec.shape[0] // k, k, b, b)
    lifted = torch.zeros(q.shape[0], target, target, dtype=vec.dtype, device=vec.device)
    for j in range(k):
        lifted[:, j * b : (j + 1) * b, j * b : (j + 1) * b] = q[:, j]
    return skew_to_vec(lifted)


def dense_block_diagonal(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size x size`` block-diagonal matrix of ``(r, b, b)`` blocks (``r = 1``: the one block
    repeated on every ``b x b`` diagonal block, PEFT's ``block_share``); same dtype and device.
    ``size`` must be ``r * b`` (or a multiple of ``b`` for a shared block)."""
    r, b, _ = blocks.shape
    groups = size // b
    if size % b or r not in (1, groups):
        raise ValueError(f"{r} blocks of size {b} do not make a {size} x {size} block-diagonal matrix")
    return torch.block_diag(*blocks.expand(groups, b, b).unbind(0))
