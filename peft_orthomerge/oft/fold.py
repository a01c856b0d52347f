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


def fold_weight(
    weight: torch.Tensor,
    rotation: torch.Tensor,
    kind: str,
    *,
    out_scale: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Return ``weight`` with the block rotation ``rotation`` folded in (see the module docstring)."""
    dtype = weight.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w2 = weight.reshape(weight.shape[0], -1).to(work)
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
    folded = torch.bmm(w2.view(out_dim, groups, b).transpose(0, 1), rot).transpose(0, 1).reshape(out_dim, in_dim)
    if out_scale is not None:
        folded = folded * out_scale.to(device=w2.device, dtype=work).reshape(out_dim, 1)
    return folded.reshape(weight.shape).to(dtype)
