"""Reading LoRA adapters (directory, Hub id, or an adapter loaded in a `PeftModel`) into task vectors.

An adapter is its ``adapter_config.json`` (validated: a plain, foldable LoRA) and a tensor source.
Tensor keys are PEFT's saved keys (``base_model.model.<module>.lora_A.weight``, ...); the
``<module>`` part is the module name in the base model, so ``<module>.weight`` is the base tensor.
Folding follows `peft_orthomerge.ops.lora_fold`. Nothing here merges.

Full tensors: ``modules_to_save`` copies (``base_model.model.lm_head.weight``) and biases trained
with ``bias="lora_only"`` / ``"all"`` (``...q_proj.base_layer.bias``, ``...o_proj.bias``) are
whole replacement values of a base tensor; `LoraAdapter.full` maps the base tensor's name
(``lm_head.weight``, ``...q_proj.bias``) to the saved key. A merge treats them like the tensors
of a full fine-tune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompatibleInputsError, InputError
from ..ops.lora_fold import dora_weight, lora_delta, lora_scaling, module_rank_alpha
from .in_memory import DictSource, TensorSource
from .jsonfile import read_json_object
from .tensors import TensorReader

PREFIX = "base_model.model."
SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".base_layer.weight": "base_weight",  # saved with save_embedding_layers=True; PEFT loads it over the base
}
# init methods that change the base weights: the adapter is relative to a different base
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# config options whose effect cannot be folded into a weight delta
UNFOLDABLE = (
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "layer_replication",
    "megatron_config",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
)


@dataclass
class LoraModule:
    """The tensor keys of one adapted module. ``kind`` is ``"linear"`` or ``"embedding"``."""

    key: str
    kind: str
    parts: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraAdapter:
    """A validated LoRA adapter: ``modules`` (module key -> its LoRA tensors) and ``full`` (base
    tensor name -> saved key of a whole replacement value: ``modules_to_save``, trained biases)."""

    ref: str
    label: str  # file or adapter name, for messages
    config: dict[str, Any]
    source: TensorSource
    modules: dict[str, LoraModule]
    full: dict[str, str] = field(default_factory=dict)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    def scaling(self, module_key: str) -> float:
        return lora_scaling(self.config, module_key)

    def expert_weight(
        self, module_key: str, w0: torch.Tensor, *, fan_in_fan_out: bool, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The expert's full weight ``W_i`` of ``module_key`` in the base weight's stored layout."""
        mod = self.modules[module_key]
        if "base_weight" in mod.parts:
            saved = self.source.get(mod.parts["base_weight"])
            if tuple(saved.shape) != tuple(w0.shape):
                raise IncompatibleInputsError(
                    f"saved base weight {tuple(saved.shape)} does not fit the base model's {tuple(w0.shape)} (resized vocabulary?)",
                    path=self.label,
                    tensor=mod.parts["base_weight"],
                )
            w0 = saved.to(w0.dtype)
        a = self.source.get(mod.parts["A"])
        b = self.source.get(mod.parts["B"])
        r, _ = module_rank_alpha(self.config, module_key)
        embedding = mod.kind == "embedding"
        if embedding:
            expect_a, expect_b = (r, w0.shape[0]), (w0.shape[1], r)
        else:
            rows, cols = (w0.shape[1], w0.shape[0]) if fan_in_fan_out else tuple(w0.shape)
            expect_a, expect_b = (r, cols), (rows, r)
        if w0.dim() != 2 or tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
            raise IncompatibleInputsError(
                f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} (rank {r} from the config) do not fit "
                f"the base weight {tuple(w0.shape)}",
                path=self.label,
                tensor=mod.parts["A"],
                hint="Was this adapter trained on another base model?",
            )
        delta = lora_delta(
            a, b, self.scaling(module_key), fan_in_fan_out=fan_in_fan_out, embedding=embedding, dtype=dtype
        )
        if "magnitude" in mod.parts:
            if embedding:
                raise IncompatibleInputsError(
                    "DoRA on embedding layers is not supported", path=self.label, tensor=mod.parts["magnitude"]
                )
            mag = self.source.get(mod.parts["magnitude"])
            out_features = w0.shape[1] if fan_in_fan_out else w0.shape[0]
            if mag.numel() != out_features:
                raise IncompatibleInputsError(
                    f"DoRA magnitude has {mag.numel()} entries for {out_features} output features",
                    path=self.label,
                    tensor=mod.parts["magnitude"],
                )
            return dora_weight(w0.to(dtype), delta, mag, fan_in_fan_out=fan_in_fan_out)
        return w0.to(dtype) + delta

    def full_tensor(self, name: str) -> torch.Tensor:
        """The saved replacement value of base tensor ``name`` (a key of `full`)."""
        return self.source.get(self.full[name])

    def bias_delta(self, module_key: str) -> torch.Tensor | None:
        mod = self.modules[module_key]
        if "bias" not in mod.parts:
            return None
        return self.source.get(mod.parts["bias"]).to(torch.float64) * self.scaling(module_key)


def validate_config(config: Mapping[str, Any], label: str) -> None:
    """Refuse anything that is not a plain LoRA whose effect is a weight delta on an unchanged base."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "OFT":
        raise IncompatibleInputsError(
            "this is an OFT adapter, not LoRA",
            path=label,
            hint="Merge OFT adapters with merge_oft_adapters / merge_oft_checkpoints.",
        )
    if peft_type != "LORA":
        raise IncompatibleInputsError(
            f"unsupported adapter type {peft_type or '(missing peft_type)'!r}; expected LORA", path=label
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise IncompatibleInputsError(
            f"init_lora_weights={init!r} modifies the base weights, so this adapter is relative to a different base",
            path=label,
            hint="Convert it to a plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...)).",
        )
    for key in UNFOLDABLE:
        if config.get(key):
            raise IncompatibleInputsError(
                f"LoRA option {key}={config[key]!r} cannot be folded into the weights", path=label
            )
    for key in ("r", "lora_alpha"):
        _check_positive_number(config.get(key, 8), key, label)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, Mapping):
            raise IncompatibleInputsError(
                f"invalid {key}={pattern!r} in the adapter config (expected an object)", path=label
            )
        for module, value in pattern.items():
            _check_positive_number(value, f"{key}[{module!r}]", label)


def _check_positive_number(value: Any, key: str, label: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise IncompatibleInputsError(
            f"invalid {key}={value!r} in the adapter config (expected a positive number)", path=label
        )


def _lora_part(name: str) -> tuple[str, str, str] | None:
    """``(module key, part, suffix)`` of a LoRA tensor name, or ``None``."""
    for suffix, part in SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], part, suffix
    return None


def index_tensors(keys: list[str], label: str) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Group adapter tensor keys by module, and map full tensors (``modules_to_save``, trained
    biases: names ending in ``.weight`` / ``.bias``) to the base tensor they replace; any other
    tensor is an error."""
    modules: dict[str, LoraModule] = {}
    full: dict[str, str] = {}
    for key in keys:
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        found = _lora_part(name)
        if found is not None:
            module_key, part, suffix = found
            mod = modules.setdefault(module_key, LoraModule(module_key, "linear"))
            if "embedding" in suffix:
                mod.kind = "embedding"
            mod.parts[part] = key
        elif name.endswith((".weight", ".bias")):
            full[name.replace(".base_layer.", ".")] = key
        else:
            raise IncompatibleInputsError(
                "tensor is neither a LoRA weight (A, B, bias or DoRA magnitude) nor a full weight or bias",
                path=label,
                tensor=key,
                hint="Adapters with trainable tokens are not supported.",
            )
    for mod in modules.values():
        missing = [p for p in ("A", "B") if p not in mod.parts]
        if missing:
            raise IncompatibleInputsError(f"LoRA module lacks lora_{missing[0]}", path=label, tensor=mod.key)
    if not modules and not full:
        raise InputError("adapter holds no LoRA weights", path=label)
    return modules, full


def read_adapter_dir(ref: str, directory: Path) -> LoraAdapter:
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise InputError("no adapter_config.json (not a PEFT adapter directory)", path=directory)
    config = read_json_object(config_path, what="adapter config")
    validate_config(config, str(config_path))
    reader = TensorReader.from_dir(directory, "adapter_model")
    label = str(reader.files[0]) if reader.files else str(directory)
    return LoraAdapter(ref, label, config, reader, *index_tensors(reader.keys(), label))


def read_loaded_adapter(model: Any, name: str) -> LoraAdapter:
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config[name].to_dict()
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in config.items()}
    label = f"loaded adapter {name!r}"
    validate_config(config, label)
    state = get_peft_model_state_dict(model, adapter_name=name)
    return LoraAdapter(name, label, config, DictSource(state, label), *index_tensors(list(state), label))
