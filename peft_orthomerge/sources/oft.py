"""Reading PEFT OFT adapters (files or adapters loaded in a `PeftModel`) into canonical skew vectors.

Formats:

- PEFT >= 0.16: ``base_model.model.<module>.oft_R.weight`` (``oft_embedding_R`` for embeddings),
  shape ``(r, n)``, ``n = b(b-1)/2`` (``r = 1`` with ``block_share``). The stored sign depends on
  ``use_cayley_neumann`` (see `peft_orthomerge.ops.skew`); ``coft=True`` means PEFT projects each
  block to Frobenius norm at most ``eps / sqrt(r)`` before use, so we read the projected vector.
- Legacy PEFT 0.14-0.15.2: ``<module>.oft_r`` full ``(r, b, b)`` blocks ``X``, skew part
  ``S = (X - X^T)/2``, rotation ``(I - S)(I + S)^-1`` (canonical ``Q = -S``), and ``<module>.oft_s``
  of shape ``(out, 1)`` scaling output rows. Convertible when every ``oft_s`` is 1; otherwise
  the adapter can only be folded into a base model.
- Configs without ``oft_block_size`` come from PEFT <= 0.13 (a different parametrisation): refused.

Every other tensor in the file (biases with ``bias="all"|"oft_only"``, ``modules_to_save``, saved
embedding base weights) is a *pass-through* tensor, merged by weighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompatibleInputsError, InputError, NumericalError, OrthoMergeError
from ..ops.finite import all_finite
from ..ops.skew import block_norms, block_size_from_n, skew_to_vec, to_canonical
from .in_memory import DictSource
from .jsonfile import read_json_object
from .tensors import TensorReader

PREFIX = "base_model.model."
NEW_SUFFIXES = {".oft_R.weight": "linear", ".oft_embedding_R.weight": "embedding"}
LEGACY_R, LEGACY_S = ".oft_r", ".oft_s"


@dataclass
class OftModule:
    """One adapted module. ``name`` is relative to the base model (``model.layers.0.mlp.up_proj``);
    ``kind`` is ``"embedding"`` (rotation acts on the embedding dim: ``E @ blockdiag(R)``) or
    ``"linear"`` (Linear / Conv2d: ``W @ blockdiag(R)^T`` on the flattened input dim)."""

    name: str
    key: str
    kind: str
    r: int
    b: int
    scale_key: str | None = None  # legacy oft_s


@dataclass
class OftAdapter:
    """A validated OFT adapter: config, modules, pass-through keys, and lazy tensors."""

    ref: str
    label: str  # path or adapter name, for messages
    config: dict[str, Any]
    tensors: Any  # TensorReader | DictSource
    modules: dict[str, OftModule]
    passthrough: list[str]
    legacy: bool = False
    fold_only_reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def use_cayley_neumann(self) -> bool:
        """The stored convention. Legacy checkpoints always used the exact Cayley map."""
        return False if self.legacy else bool(self.config.get("use_cayley_neumann", True))

    @property
    def terms(self) -> int:
        return int(self.config.get("num_cayley_neumann_terms", 5))

    @property
    def block_share(self) -> bool:
        return bool(self.config.get("block_share", False))

    def canonical(self, name: str, *, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """Canonical vectors ``(r, n)`` of module ``name`` as PEFT would apply them, in ``dtype``
        (``None``: the stored float32 / float64; half precisions widened to float32)."""
        return self.canonical_with_norms(name, dtype=dtype)[0]

    def canonical_with_norms(
        self, name: str, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`canonical` plus its per-block norms ``||Q_k||_F`` (float64 ``(r,)``, `block_norms`), which
        also serve as the NaN / Inf check (`NumericalError` naming file and tensor)."""
        mod = self.modules[name]
        raw = self.tensors.get(mod.key, check_finite=False)
        work = dtype or (raw.dtype if raw.dtype in (torch.float32, torch.float64) else torch.float32)
        vec = raw.to(work)
        if self.legacy or self.config.get("coft", False):  # rare formats: check the raw entries, then transform
            if not all_finite(vec):
                raise NumericalError(
                    "tensor contains NaN or Inf values", path=self.tensors.file_of(mod.key), tensor=mod.key
                )
            if self.legacy:
                vec = skew_to_vec(-0.5 * (vec - vec.transpose(-2, -1)))
            else:
                vec = to_canonical(
                    coft_project(vec, float(self.config.get("eps", 6e-5))), self.use_cayley_neumann, dtype=work
                )
        else:
            vec = to_canonical(vec, self.use_cayley_neumann, dtype=work)
        norms = block_norms(vec)
        if not math.isfinite(float(norms.sum())):  # NaN / Inf anywhere make their block's norm non-finite
            raise NumericalError(
                "tensor contains NaN or Inf values", path=self.tensors.file_of(mod.key), tensor=mod.key
            )
        return vec, norms

    def stored_canonical_key(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
        """The key of module ``name``'s stored tensor when it can be read as it is into a ``(r, n)`` buffer of
        ``shape`` and ``dtype`` to give the canonical vectors, negated in place where `stores_negated`
        (current layout, ``coft`` off, the stored shape and dtype equal to the buffer's); else ``None``
        (then use `canonical_with_norms`). Nothing is checked: the caller's `block_norms` of the values
        read are the NaN / Inf check."""
        mod = self.modules[name]
        if (
            self.legacy
            or self.config.get("coft", False)
            or (mod.r, mod.b * (mod.b - 1) // 2) != tuple(shape)
            or self.tensors.dtype(mod.key) != dtype
        ):
            return None
        return mod.key

    @property
    def stores_negated(self) -> bool:
        """Whether a current-layout stored vector is the negated canonical one (the exact-Cayley flag;
        `to_canonical`)."""
        return not self.use_cayley_neumann

    def output_scale(self, name: str) -> torch.Tensor | None:
        """Legacy ``oft_s`` ``(out, 1)`` of module ``name`` (``None`` when absent)."""
        key = self.modules[name].scale_key
        return None if key is None else self.tensors.get(key).double()


def coft_project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """PEFT's COFT projection: each block ``U - U^T`` clipped to Frobenius norm ``eps / sqrt(rows)``."""
    radius = eps / math.sqrt(vec.shape[0])
    norms = math.sqrt(2.0) * torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
    factor = torch.where(
        norms <= radius, torch.ones_like(norms), radius / torch.where(norms > 0, norms, torch.ones_like(norms))
    )
    return vec * factor


def module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def base_name(key: str) -> str:
    """Adapter pass-through key -> base checkpoint key (``base_model.model.`` and ``base_layer.`` removed)."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    return name.replace(".base_layer.", ".")


def _check_config(config: dict[str, Any], label: str) -> None:
    peft_type = config.get("peft_type", "")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()
    if peft_type in ("LORA", "DORA"):
        raise IncompatibleInputsError(
            "this is a LoRA adapter, not an OFT adapter",
            path=label,
            hint="Merge LoRA adapters with peft_orthomerge.merge_lora_adapters (orthogonal-residual decoupling).",
        )
    if peft_type != "OFT":
        raise IncompatibleInputsError(f"not an OFT adapter (peft_type={config.get('peft_type')!r})", path=label)
    if "oft_block_size" not in config:
        raise IncompatibleInputsError(
            "OFT adapter from PEFT <= 0.13 (no oft_block_size): that parametrisation is not supported",
            path=label,
            hint="Retrain the adapter with PEFT >= 0.14.",
        )
    for key, kind, default in _CONFIG_NUMBERS:
        value = config.get(key, default)
        if value is None and default is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or value < 0
            or (kind is int and key == "num_cayley_neumann_terms" and value < 1)
        ):
            raise InputError(
                f"invalid {key}={value!r} in the adapter config",
                path=label,
                hint=f"Expected a {'non-negative integer' if kind is int else 'non-negative number'}.",
            )


# (key, accepted type, default): numbers of the adapter config that the reader and planner use.
_CONFIG_NUMBERS = (
    ("oft_block_size", int, 0),
    ("r", int, 0),
    ("num_cayley_neumann_terms", int, 5),
    ("eps", (int, float), 6e-5),
)


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / "adapter_config.json"
    if not file.is_file():
        raise InputError("no adapter_config.json: not a PEFT adapter directory", path=directory)
    return read_json_object(file, what="adapter config")


def _current_module(key: str, kind: str, shape: tuple[int, ...], label: str) -> OftModule:
    """A PEFT >= 0.16 module from its ``oft_R`` / ``oft_embedding_R`` header: ``(r, b(b-1)/2)``."""
    if len(shape) != 2 or shape[0] < 1:
        raise InputError(f"OFT tensor must be 2-D (r, n) with r >= 1, got shape {shape}", path=label, tensor=key)
    try:
        b = block_size_from_n(shape[1])
    except OrthoMergeError as exc:
        raise InputError(exc.message, path=label, tensor=key) from None
    name = module_name(key, next(s for s in NEW_SUFFIXES if key.endswith(s)))
    return OftModule(name, key, kind, shape[0], b)


def _legacy_module(key: str, shape: tuple[int, ...], tensors: Any, label: str) -> OftModule:
    """A PEFT 0.14-0.15.2 module from its ``oft_r`` header ``(r, b, b)`` (and its ``oft_s``, if any)."""
    if len(shape) != 3 or shape[0] < 1 or shape[1] != shape[2]:
        raise InputError(f"legacy oft_r must be (r, b, b), got shape {shape}", path=label, tensor=key)
    name = module_name(key, LEGACY_R)
    skey = key[: -len(LEGACY_R)] + LEGACY_S
    return OftModule(name, key, "linear", shape[0], shape[1], skey if skey in tensors else None)


def _index_tensors(tensors: Any, label: str) -> tuple[dict[str, OftModule], list[str], bool]:
    """Module name -> `OftModule`, the pass-through keys, and whether the adapter is legacy."""
    modules: dict[str, OftModule] = {}
    passthrough: list[str] = []
    legacy = any(k.endswith(LEGACY_R) for k in tensors.keys())
    for key in tensors.keys():
        shape = tensors.shape(key)
        kind = next((kind for suffix, kind in NEW_SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is not None:
            if legacy:
                raise InputError(
                    "adapter mixes legacy (oft_r) and current (oft_R) OFT tensors", path=label, tensor=key
                )
            module = _current_module(key, kind, shape, label)
            modules[module.name] = module
        elif key.endswith(LEGACY_R):
            module = _legacy_module(key, shape, tensors, label)
            modules[module.name] = module
        elif not (key.endswith(LEGACY_S) and legacy):
            passthrough.append(key)
    return modules, passthrough, legacy


def _convert_legacy(adapter: OftAdapter) -> None:
    """Legacy output scales that are all ones are dropped; others make the adapter fold-only."""
    if adapter.config.get("coft"):
        raise IncompatibleInputsError("legacy OFT adapter with coft=True is not supported", path=adapter.label)
    for mod in adapter.modules.values():
        if mod.scale_key is None:
            continue
        s = adapter.tensors.get(mod.scale_key)
        if not bool((s == 1).all()):
            adapter.fold_only_reason = (
                f"legacy OFT adapter (PEFT <= 0.15.2) whose output scale {mod.scale_key} is not all ones: "
                "not representable as a current OFT adapter"
            )
            break
    if adapter.fold_only_reason is None:
        for mod in adapter.modules.values():
            mod.scale_key = None  # all ones: drop
    adapter.warnings.append(f"{adapter.label}: legacy OFT format (PEFT 0.14-0.15.2) converted to the current layout")


def parse_adapter(ref: str, label: str, config: dict[str, Any], tensors: Any) -> OftAdapter:
    """Validate ``config`` and the tensor headers of one adapter; no tensor data is read except ``oft_s``."""
    _check_config(config, label)
    modules, passthrough, legacy = _index_tensors(tensors, label)
    if not modules:
        raise IncompatibleInputsError("adapter holds no OFT tensors (oft_R / oft_embedding_R)", path=label)
    if config.get("block_share") and any(m.r != 1 for m in modules.values()):
        bad = next(m for m in modules.values() if m.r != 1)
        raise InputError(f"block_share=True but {bad.r} blocks are stored", path=label, tensor=bad.key)
    adapter = OftAdapter(ref, label, config, tensors, modules, passthrough, legacy=legacy)
    if legacy:
        _convert_legacy(adapter)
    elif config.get("use_cayley_neumann", True) and _older_than(config.get("peft_version"), (0, 18)):
        adapter.warnings.append(
            f"{label}: saved by PEFT < 0.18 with use_cayley_neumann=True; PEFT changed the Neumann formula in 0.18 "
            "and this adapter is read with the current one"
        )
    return adapter


def _older_than(version: Any, minimum: tuple[int, int]) -> bool:
    if not version:
        return True
    try:
        parts = str(version).partition("@")[0].split(".")
        return (int(parts[0]), int(parts[1])) < minimum
    except (ValueError, IndexError):
        return False


def read_adapter_dir(ref: str, directory: Path, *, allow_pickle: bool = False) -> OftAdapter:
    """Read an adapter directory (config + ``adapter_model.safetensors``)."""
    config = read_config(directory)
    _check_config(config, str(directory))
    tensors = TensorReader.from_dir(directory, "adapter_model", allow_pickle=allow_pickle)
    return parse_adapter(ref, str(directory), config, tensors)


def read_loaded_adapter(model: Any, name: str) -> OftAdapter:
    """Read adapter ``name`` loaded in a `PeftModel` (its state dict, keys as in a saved file)."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[name].to_dict()
    label = f"<loaded adapter {name!r}>"
    _check_config(config, label)
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return parse_adapter(name, label, config, DictSource(state, label, device="cpu"))
