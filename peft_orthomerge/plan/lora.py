"""The plan of a LoRA merge: which base modules the adapters touch, checked against the model.

Built before any tensor is merged: every module any adapter adapts must exist in the base with a
real (not quantized, not meta) 2-D floating weight of the kind the adapter expects (Linear /
Conv1D or Embedding), and must not share its weight with another module (tied embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import IncompatibleInputsError
from ..sources.lora import LoraAdapter, LoraModule


@dataclass(frozen=True)
class LoraTarget:
    """One adapted base module; ``fan_in_fan_out``: a GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""

    key: str
    module: torch.nn.Module
    fan_in_fan_out: bool


def _base_weight(base: Any, key: str, mod: LoraModule, label: str) -> torch.nn.Module:
    """The base module ``key``, refused unless it has a real 2-D floating weight of the adapter's kind."""
    try:
        module = base.get_submodule(key)
    except AttributeError:
        module = None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and (not weight.is_floating_point() or weight.is_meta):
        raise IncompatibleInputsError(
            f"base weight is {'on the meta device' if weight.is_meta else f'quantized ({weight.dtype})'}; "
            "merging needs the real floating-point weights",
            path=label,
            tensor=f"{key}.weight",
            hint="Load the base model unquantized, on cpu or cuda.",
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise IncompatibleInputsError(
            "LoRA target module is missing from the base model (or has no 2-D weight)",
            path=label,
            tensor=mod.parts["A"],
            hint="Was this adapter trained on another base model?",
        )
    if isinstance(module, torch.nn.Embedding) != (mod.kind == "embedding"):
        raise IncompatibleInputsError(
            f"adapter has {mod.kind} LoRA weights but the base module is {type(module).__name__}",
            path=label,
            tensor=mod.parts["A"],
        )
    return module


def plan_lora(base: Any, sources: Sequence[LoraAdapter]) -> dict[str, LoraTarget]:
    """Module key -> `LoraTarget` for every module any adapter touches, in first-seen order."""
    from transformers.pytorch_utils import Conv1D

    owners: dict[int, list[str]] = {}
    for pname, param in base.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    plan: dict[str, LoraTarget] = {}
    for src in sources:
        for key, mod in src.modules.items():
            if key in plan:
                continue
            module = _base_weight(base, key, mod, src.label)
            tied = owners.get(id(module.weight), [])
            if len(tied) > 1:
                raise IncompatibleInputsError(
                    f"the weight of this module is tied ({', '.join(tied)}); merging into it would change both",
                    path=src.label,
                    tensor=mod.parts["A"],
                    hint="Untie the weights (config.tie_word_embeddings=False) or drop the module from the adapters.",
                )
            plan[key] = LoraTarget(key, module, isinstance(module, Conv1D))
    return plan
