"""Full checkpoints as merge inputs: opening (safetensors, or opted-in pickle; a LoRA or OFT adapter
as the checkpoint it makes of the base, an OFT adapter with its exact rotations), checking that a
set of fine-tunes matches its base (headers only), and lazy per-tensor and per-row-block views."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import IncompatibleInputsError
from ..ops.decouple import BlockRotation
from .jsonfile import read_json_object
from .layout import conv1d_weight_names
from .lora import read_adapter_dir as read_lora_dir
from .lora_checkpoint import LoraCheckpoint
from .oft import read_adapter_dir as read_oft_dir
from .oft_checkpoint import OftCheckpoint
from .resolve import resolve_source
from .tensors import TensorReader


def open_checkpoint(ref: str | os.PathLike, allow_pickle: bool) -> tuple[Path, TensorReader]:
    """``model.safetensors`` (or shards); else transformers' pickle ``pytorch_model.bin``, refused
    unless ``allow_pickle`` (then read with ``weights_only=True``)."""
    directory = resolve_source(ref, kind="model", allow_pickle=allow_pickle)
    legacy = directory / "pytorch_model.bin"
    has_safetensors = (
        any(directory.glob("model*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    )
    if legacy.is_file() and not has_safetensors:
        return directory, TensorReader.from_file(legacy, allow_pickle=allow_pickle)
    return directory, TensorReader.from_dir(directory, "model", allow_pickle=allow_pickle)


def validate_checkpoints(base: TensorReader, experts: Sequence[TensorReader]) -> None:
    """Same tensor names and shapes everywhere (headers only); raises naming file and tensor."""
    names = set(base.keys())
    for reader in experts:
        extra = sorted(set(reader.keys()) - names)
        missing = sorted(names - set(reader.keys()))
        if extra or missing:
            key = (missing or extra)[0]
            what = "missing from the fine-tuned checkpoint" if missing else "not in the base checkpoint"
            raise IncompatibleInputsError(
                f"tensor {what} ({len(missing)} missing, {len(extra)} extra)",
                path=reader.files[0],
                tensor=key,
                hint="Is this a fine-tune of the same base model?",
            )
        for key in base.keys():
            if base.shape(key) != reader.shape(key):
                raise IncompatibleInputsError(
                    f"shape mismatch: base {base.shape(key)} vs fine-tuned {reader.shape(key)}",
                    path=reader.file_of(key),
                    tensor=key,
                    hint="Is this a fine-tune of the same base model?",
                )


class LazyTensors(Sequence):
    """The experts' copies of one tensor, each read from its file when indexed (and dropped by the
    caller after use), so at most one expert's full tensor is alive at a time."""

    def __init__(self, readers: Sequence[TensorReader], name: str, *, transpose: bool = False) -> None:
        self.readers, self.name, self.transpose = list(readers), name, transpose

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        tensor = self.readers[i].get(self.name)
        return tensor.T if self.transpose else tensor


class FileRows:
    """One tensor of a checkpoint as a `RowSource`: blocks of rows read from the file on demand."""

    def __init__(self, reader: TensorReader, name: str) -> None:
        self.reader, self.name = reader, name
        self.shape = reader.shape(name)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.reader.get_rows(self.name, start, stop)


def input_kind(directory: Path) -> str:
    """What a local input directory holds: ``"lora"`` or ``"oft"`` (a PEFT adapter, by its
    config's ``peft_type``; another adapter type gives that type in lower case), ``"full"`` (a
    model checkpoint: ``config.json``) or ``"unknown"``."""
    config = directory / "adapter_config.json"
    if config.is_file():
        peft_type = read_json_object(config, what="adapter config").get("peft_type", "")
        peft_type = str(getattr(peft_type, "value", peft_type)).lower()
        return peft_type or "unknown adapter"
    return "full" if (directory / "config.json").is_file() else "unknown"


Expert = TensorReader | LoraCheckpoint | OftCheckpoint


def open_expert(ref: str | os.PathLike, base: TensorReader, base_dir: Path, allow_pickle: bool) -> tuple[Path, Expert]:
    """A fine-tuned expert of ``base`` as a checkpoint: a full checkpoint as it is, a LoRA adapter
    as the checkpoint it makes of the base (`LoraCheckpoint`), an OFT adapter likewise and with its
    exact rotations (`OftCheckpoint`). Other adapters are refused."""
    directory = resolve_source(ref, kind="config")
    kind = input_kind(directory)
    if kind in ("full", "unknown"):  # a checkpoint, or nothing: open_checkpoint says what is missing
        return open_checkpoint(ref, allow_pickle)
    if kind not in ("lora", "oft"):
        raise IncompatibleInputsError(
            f"this is a{'n' if kind[0] in 'aeiou' else ''} {kind.upper()} adapter; merge_models takes full checkpoints, "
            "LoRA and OFT adapters",
            path=directory,
            hint="Fold it into the base with PEFT (merge_and_unload, save_pretrained) and pass that checkpoint.",
        )
    directory = resolve_source(ref, kind="adapter")
    conv1d = conv1d_weight_names(base_dir, base.keys())
    if kind == "oft":
        return directory, OftCheckpoint(base, read_oft_dir(str(ref), directory, allow_pickle=allow_pickle), conv1d)
    return directory, LoraCheckpoint(base, read_lora_dir(str(ref), directory), conv1d)


def expert_rotation(expert: Expert, key: str) -> BlockRotation | None:
    """The rotation ``expert`` brings for 2-D weight ``key`` (an OFT adapter's exact one), else ``None``."""
    return expert.rotation(key) if isinstance(expert, OftCheckpoint) else None


def rotated_tensors(experts: Sequence[Expert]) -> set[str]:
    """The weights for which some expert brings its own rotation (`expert_rotation`)."""
    return {key for e in experts if isinstance(e, OftCheckpoint) for key in e.rotated()}
