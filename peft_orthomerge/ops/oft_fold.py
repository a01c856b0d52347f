"""Folding OFT rotations into base weights with the block structure (never a dense ``in x in`` matrix).

- Linear ``W`` ``(out, in)``: PEFT rotates the input, ``x_blk -> x_blk @ R_k``, so
  ``W_eff = W @ blockdiag(R)^T``: column group ``k`` of ``W`` times ``R_k^T``.
- Conv2d ``W`` ``(out, in, kh, kw)``: the same on ``W.reshape(out, in*kh*kw)`` (PEFT's merge).
- Embedding ``E`` ``(num, dim)``: PEFT rotates the looked-up rows, ``E_eff = E @ blockdiag(R)``.
- Legacy ``oft_s`` ``(out, 1)`` scales the output rows afterwards: ``W_eff * s``.

``R`` is ``(r, b, b)`` with ``r = in / b``, or ``(1, b, b)`` shared by every group (``block_share``).
Cost ``out * in * b``. Computed in float32 (float64 for float64 weights), returned in ``W``'s dtype.
"""

from __future__ import annotations

import torch

from ..errors import IncompatibleInputsError

CHUNK_ELEMENTS = 1 << 20  # rows converted to the working dtype at a time (weights not already in it)


def _fold_rows(w2: torch.Tensor, rot: torch.Tensor, out: torch.Tensor) -> None:
    """``out = w2 @ blockdiag(rot)``: one strided batched GEMM over the column groups.

    ``w2.view(rows, groups, b).transpose(0, 1)`` is a ``(groups, rows, b)`` batch with leading
    dimension ``in``, which BLAS reads in place; the result goes straight into ``out`` the same way
    (no transposed copies, no temporaries).
    """
    rows, _in_dim = w2.shape
    groups, b, _ = rot.shape
    torch.bmm(w2.view(rows, groups, b).transpose(0, 1), rot, out=out.view(rows, groups, b).transpose(0, 1))


def fold_weight(
    weight: torch.Tensor,
    rotation: torch.Tensor,
    kind: str,
    *,
    out_scale: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Return ``weight`` with the block rotation ``rotation`` folded in (see the module docstring).

    The result is one new tensor in ``weight``'s dtype; weights in another dtype than the working
    one (bf16 / fp16) are converted a few rows at a time into a reused float32 buffer.
    """
    dtype = weight.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w2 = weight.reshape(weight.shape[0], -1)
    out_dim, in_dim = w2.shape
    r, b, _ = rotation.shape
    if in_dim % b or (r != 1 and r * b != in_dim):
        raise IncompatibleInputsError(
            f"OFT rotation of {r} block(s) of size {b} does not fit a weight of shape {tuple(weight.shape)}",
            tensor=name,
            hint="The adapter was trained for a different base model.",
        )
    groups = in_dim // b
    rot = rotation.to(device=w2.device, dtype=work).expand(groups, b, b)
    if kind != "embedding":
        rot = rot.transpose(-2, -1)
    rot = rot.contiguous()
    scale = None if out_scale is None else out_scale.to(device=w2.device, dtype=work).reshape(out_dim, 1)
    result = torch.empty((out_dim, in_dim), dtype=dtype, device=w2.device)
    if dtype == work and w2.is_contiguous():
        _fold_rows(w2, rot, result)
        if scale is not None:
            result.mul_(scale)
    else:
        step = max(1, CHUNK_ELEMENTS // max(in_dim, 1))
        buffers = torch.empty((2, min(step, out_dim), in_dim), dtype=work, device=w2.device)
        for start in range(0, out_dim, step):
            stop = min(start + step, out_dim)
            chunk, folded = buffers[0, : stop - start], buffers[1, : stop - start]
            chunk.copy_(w2[start:stop])
            _fold_rows(chunk, rot, folded)
            if scale is not None:
                folded.mul_(scale[start:stop])
            result[start:stop].copy_(folded)
    return result.reshape(weight.shape)
