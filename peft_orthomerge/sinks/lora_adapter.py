"""Merged weights as a LoRA adapter: the rank-``r`` truncated SVD of each merged delta.

The adapter is PEFT's ``"default"`` LoRA adapter (``lora_alpha = r``, so PEFT's scaling is 1)
on the base model, with ``B @ A`` in PEFT's layout: ``(out, in)`` for Linear, transposed for
``Conv1D`` (``fan_in_fan_out``) and Embedding modules. The relative Frobenius error of each
truncation is reported.
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan.lora import LoraTarget
from ..report import MergeReport


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``
    (zero-padded to ``rank`` when the matrix is smaller)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    total = float(torch.linalg.vector_norm(s))
    err = float(torch.linalg.vector_norm(s[k:])) / total if total > 0 else 0.0
    return a, b, err


def _copy_factors(peft_model: Any, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    layer = peft_model.base_model.model.get_submodule(key)
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        layer.lora_embedding_A["default"].data.copy_(a.to(layer.lora_embedding_A["default"].dtype))
        layer.lora_embedding_B["default"].data.copy_(b.to(layer.lora_embedding_B["default"].dtype))
    else:
        layer.lora_A["default"].weight.data.copy_(a.to(layer.lora_A["default"].weight.dtype))
        layer.lora_B["default"].weight.data.copy_(b.to(layer.lora_B["default"].weight.dtype))


def export_lora(
    base: Any, plan: dict[str, LoraTarget], merged: dict[str, torch.Tensor], rank: int, report: MergeReport
) -> Any:
    """A `PeftModel` on ``base`` whose adapter approximates each merged weight (module doc)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(plan), lora_dropout=0.0, init_lora_weights=True)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    worst = 0.0
    stats = {s.name: s for s in report.modules}
    for key, target in plan.items():
        delta = merged[key] - target.module.weight.detach().to(torch.float64)
        is_embedding = isinstance(target.module, torch.nn.Embedding)
        mat = delta.T if (target.fan_in_fan_out or is_embedding) else delta  # B @ A in PEFT's layout
        a, b, err = truncated_factors(mat, rank)
        worst = max(worst, err)
        if f"{key}.weight" in stats:
            stats[f"{key}.weight"].extra["lora_relative_error"] = err
        factors[key] = (a, b)
    peft_model = get_peft_model(base, config)
    for key, (a, b) in factors.items():
        _copy_factors(peft_model, key, a, b)
    report.params["lora_max_relative_error"] = worst
    report.warnings.append(
        f"export='lora': rank-{rank} truncated SVD of the merged deltas; max relative Frobenius error {worst:.3e}"
    )
    return peft_model
