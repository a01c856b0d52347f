"""Which checkpoint tensors are stored ``(in, out)``: weights of transformers' ``Conv1D``.

The merge math uses torch layout ``W`` of shape ``(out, in)`` (``y = x @ W.T + b``) and rotates a
weight on its input side, ``W0 @ P`` with ``P`` of shape ``(in, in)``. GPT-2-style models store
their projections as ``transformers.pytorch_utils.Conv1D``, whose weight is ``(in, out)``
(``y = x @ W + b``); such a tensor must be transposed before the math and back afterwards.
`conv1d_weight_names` says which tensors those are, by building the architecture of a local
checkpoint on the meta device (no weights allocated, no network, never remote code);
`lora_weight_modules` says, from the same build, which 2-D weights a PEFT LoRA adapter can hold.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["conv1d_weight_names", "lora_weight_modules"]


def conv1d_weight_names(model_dir: str | os.PathLike, names: Iterable[str]) -> set[str]:
    """Return the subset of checkpoint tensor ``names`` that are ``Conv1D`` weights, stored ``(in, out)``.

    The architecture comes from ``model_dir/config.json`` (local files only, never
    ``trust_remote_code``); it is built on the meta device, so no weight memory is allocated.
    A ``Conv1D`` module ``m`` contributes ``m + ".weight"`` (never its bias); names match with or
    without the model's ``base_model_prefix`` (a checkpoint saved from ``GPT2Model`` has
    ``h.0.attn.c_attn.weight``, one from ``GPT2LMHeadModel`` has
    ``transformer.h.0.attn.c_attn.weight``). Every other tensor keeps torch layout ``(out, in)``.

    Without ``config.json`` the result is empty, silently. When the architecture cannot be built
    (invalid config, unknown ``model_type``, a config that needs remote code via ``auto_map``,
    any error from transformers) the result is empty and one warning says that the layout could
    not be checked, so every 2-D tensor is treated as ``(out, in)``.
    """
    names = list(names)
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return set()
    try:
        conv1d = _conv1d_module_weights(config_path)
    except Exception as exc:
        warnings.warn(
            f"{config_path}: could not check the weight layout ({type(exc).__name__}: {exc}); "
            "every 2-D tensor is treated as torch layout (out, in)",
            stacklevel=2,
        )
        return set()
    return {name for name in names if name in conv1d}


def _meta_model(config_path: Path) -> Any:
    """The architecture of ``config_path`` built on the meta device (causal LM class where there is one)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    raw = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise TypeError("config.json is not a JSON object")
    if "auto_map" in raw:
        raise ValueError("the architecture needs remote code (auto_map), which is never run")
    config = AutoConfig.from_pretrained(config_path.parent, local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=False)


def _checkpoint_names(model: Any, weight: str) -> tuple[str, str]:
    """A module weight's name in the built model and with / without its ``base_model_prefix``."""
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    if not prefix:
        return weight, weight
    return weight, weight[len(prefix) :] if weight.startswith(prefix) else prefix + weight


def _conv1d_module_weights(config_path: Path) -> set[str]:
    """``Conv1D`` weight names of the architecture, with and without the base-model prefix."""
    from transformers.pytorch_utils import Conv1D

    model = _meta_model(config_path)
    found: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Conv1D):
            found.update(_checkpoint_names(model, f"{module_name}.weight"))
    return found


def _lora_kind(module: Any) -> str | None:
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, Conv1D):
        return "conv1d"
    return "linear" if isinstance(module, torch.nn.Linear) else None


def lora_weight_modules(model_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Checkpoint tensor name -> ``(module name, kind)`` for every weight a PEFT LoRA adapter can adapt.

    ``kind`` is ``"linear"`` (``nn.Linear``, weight ``(out, in)``), ``"embedding"``
    (``nn.Embedding``, ``(vocab, hidden)``) or ``"conv1d"`` (transformers' ``Conv1D``, stored
    ``(in, out)``). The module name is the one PEFT sees on the model transformers builds from
    ``model_dir/config.json`` (the causal-LM class where there is one, as on the meta device
    here), whether the checkpoint names carry the ``base_model_prefix`` or not. A weight shared
    by several modules (tied embeddings and head) is left out: a LoRA adapter on one of them
    would not act on the other.

    Raises:
        ConfigError: without ``config.json``, or when the architecture cannot be built (the
            reasons of `conv1d_weight_names`): which modules a weight belongs to is then unknown.
    """
    config_path = Path(model_dir) / "config.json"
    try:
        model = _meta_model(config_path)
    except Exception as exc:
        raise ConfigError(
            f"cannot build the architecture to find the modules a LoRA adapter can target "
            f"({type(exc).__name__}: {exc})",
            path=config_path,
            hint="Use export='model' (output.format: model).",
        ) from None
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)
    shared = {name for group in owners.values() if len(group) > 1 for name in group}
    found: dict[str, tuple[str, str]] = {}
    for module_name, module in model.named_modules():
        kind = _lora_kind(module)
        weight = f"{module_name}.weight"
        if kind is None or weight in shared:
            continue
        for name in _checkpoint_names(model, weight):
            found[name] = (module_name, kind)
    return {name: found[name] for name in names if name in found}
