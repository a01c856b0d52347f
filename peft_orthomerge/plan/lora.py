"""The plan of a LoRA merge: which base modules and tensors the adapters touch, checked against the model.

Built before any tensor is merged: every module any adapter adapts must exist in the base with a
real (not quantized, not meta) 2-D floating weight of the kind the adapter expects (Linear /
Conv1D or Embedding), and must not share its weight with another module (tied embeddings). Every
full tensor an adapter saves (``modules_to_save``, trained biases) must name a base tensor of the
same shape (a resized vocabulary is refused), not tied to another.
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


@dataclass(frozen=True)
class FullTarget:
    """A base tensor that some adapters replace whole; ``transposed``: a ``Conv1D`` weight (stored ``(in, out)``)."""

    name: str
    param: torch.Tensor
    transposed: bool


def _owners(base: Any) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for pname, param in base.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    return owners


def _full_target(base: Any, name: str, src: LoraAdapter, owners: dict[int, list[str]]) -> FullTarget:
    from transformers.pytorch_utils import Conv1D

    try:
        param = base.get_parameter(name)
    except AttributeError:
        raise IncompatibleInputsError(
            "saved tensor (modules_to_save or bias) has no counterpart in the base model",
            path=src.label,
            tensor=src.full[name],
            hint="Was this adapter trained on another base model?",
        ) from None
    saved = tuple(src.source.shape(src.full[name]))
    if saved != tuple(param.shape):
        raise IncompatibleInputsError(
            f"saved tensor of shape {saved} does not fit the base tensor {name} {tuple(param.shape)} (resized vocabulary?)",
            path=src.label,
            tensor=src.full[name],
        )
    tied = owners.get(id(param), [])
    if len(tied) > 1:
        raise IncompatibleInputsError(
            f"the base tensor is tied ({', '.join(tied)}); merging into it would change both",
            path=src.label,
            tensor=src.full[name],
            hint="Untie the weights (config.tie_word_embeddings=False) before fine-tuning with modules_to_save.",
        )
    module = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
    return FullTarget(name, param, param.dim() == 2 and isinstance(module, Conv1D))


def plan_full_tensors(base: Any, sources: Sequence[LoraAdapter], lora: dict[str, LoraTarget]) -> dict[str, FullTarget]:
    """Base tensor name -> `FullTarget` for every full tensor an adapter saves, except the weights
    of LoRA-adapted modules (those merge with the module: an adapter's saved weight is its expert)."""
    owners = _owners(base)
    lora_weights = {f"{key}.weight" for key in lora}
    lora_biases = {f"{key}.bias" for s in sources for key, mod in s.modules.items() if "bias" in mod.parts}
    plan: dict[str, FullTarget] = {}
    for src in sources:
        for name in src.full:
            if name in lora_biases:
                raise IncompatibleInputsError(
                    "this bias is trained whole by one adapter and by a LoRA bias (lora_bias=True) in another; "
                    "the two cannot be merged into one value",
                    path=src.label,
                    tensor=src.full[name],
                )
            if name not in plan and name not in lora_weights:
                plan[name] = _full_target(base, name, src, owners)
    return plan


def plan_lora(base: Any, sources: Sequence[LoraAdapter]) -> dict[str, LoraTarget]:
    """Module key -> `LoraTarget` for every module any adapter touches, in first-seen order."""
    from transformers.pytorch_utils import Conv1D

    owners = _owners(base)
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
