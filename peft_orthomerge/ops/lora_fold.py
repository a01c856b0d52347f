"""LoRA weight deltas exactly as PEFT computes them (PEFT 0.21 ``tuners/lora``).

Layouts (as stored in the base model and in PEFT adapter files):

- Linear: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; delta ``scaling * B @ A`` of shape
  ``(out, in)``. With ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``, weight stored ``(in, out)``)
  the delta is transposed to the stored layout: ``(scaling * B @ A)^T``.
- Embedding: ``lora_embedding_A`` ``(r, num_embeddings)``, ``lora_embedding_B``
  ``(embedding_dim, r)``; delta ``scaling * (B @ A)^T`` of shape ``(num_embeddings, embedding_dim)``.
- Scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` with PEFT's own key matching
  (`peft.utils.other.get_pattern_key`, keys relative to the base model, e.g.
  ``model.layers.0.self_attn.q_proj``).
- DoRA (Linear only): the folded weight is ``(m / ||W0 + delta||_row) * (W0 + delta)`` with the
  row norm taken in torch layout ``(out, in)`` (``dim=1`` after undoing ``fan_in_fan_out``),
  as in PEFT's ``DoraLinearVariant.merge``.

All arithmetic in float32 or wider (``dtype``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from peft.utils.other import get_pattern_key


def module_rank_alpha(config: Mapping[str, Any], module_key: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` of the module ``module_key`` under PEFT's ``rank_pattern`` / ``alpha_pattern`` rules."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module_key), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module_key), config.get("lora_alpha", 8))
    return int(r), float(alpha)


def lora_scaling(config: Mapping[str, Any], module_key: str) -> float:
    """PEFT's ``scaling`` of one module: ``alpha / r`` or, with ``use_rslora``, ``alpha / sqrt(r)``."""
    r, alpha = module_rank_alpha(config, module_key)
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def lora_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight delta of one LoRA module in the base weight's stored layout (see module docstring)."""
    dtype = torch.promote_types(dtype, torch.float32)
    delta = lora_b.to(dtype) @ lora_a.to(dtype)
    if embedding or fan_in_fan_out:
        delta = delta.T
    return delta * scaling


def dora_weight(
    w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The full DoRA-folded weight (stored layout), PEFT's ``dora_factor * (W0 + delta)``."""
    dtype = torch.promote_types(delta.dtype, torch.float32)
    w = w0.to(dtype) + delta.to(dtype)
    rows = w.T if fan_in_fan_out else w
    factor = magnitude.to(dtype).reshape(-1) / torch.linalg.vector_norm(rows, dim=1)
    return w * (factor[None, :] if fan_in_fan_out else factor[:, None])
