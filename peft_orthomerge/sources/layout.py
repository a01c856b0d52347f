"""Which checkpoint tensors are stored ``(in, out)``: weights of transformers' ``Conv1D``.

The merge math uses torch layout ``W`` of shape ``(out, in)`` (``y = x @ W.T + b``) and rotates a
weight on its input side, ``W0 @ P`` with ``P`` of shape ``(in, in)``. GPT-2-style models store
their projections as ``transformers.pytorch_utils.Conv1D``, whose weight is ``(in, out)``
(``y = x @ W + b``); such a tensor must be transposed before the math and back afterwards.
`conv1d_weight_names` says which tensors those are, by building the architecture of a local
checkpoint on the meta device (no weights allocated, no network, never remote code).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = ["conv1d_weight_names"]


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


def _conv1d_module_weights(config_path: Path) -> set[str]:
    """``Conv1D`` weight names of the architecture, with and without the base-model prefix."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.pytorch_utils import Conv1D

    raw = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise TypeError("config.json is not a JSON object")
    if "auto_map" in raw:
        raise ValueError("the architecture needs remote code (auto_map), which is never run")
    config = AutoConfig.from_pretrained(config_path.parent, local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=False)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    found: set[str] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, Conv1D):
            continue
        name = f"{module_name}.weight"
        found.add(name)
        if prefix:
            found.add(name[len(prefix) :] if name.startswith(prefix) else prefix + name)
    return found
