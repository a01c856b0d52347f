"""An OFT adapter seen as the full checkpoint it makes of its base, with its exact rotations, for `merge_models`.

`OftCheckpoint` answers like a `TensorReader` of the fine-tuned checkpoint: every base tensor
name, with the base's shapes and storage dtypes. An adapted weight is PEFT's own fold (what
``merge_and_unload`` computes), ``W0 @ blockdiag(R)^T`` for a Linear / Conv weight and
``E @ blockdiag(R)`` for an embedding, with R the rotation PEFT builds under the adapter's flag
(its truncated Neumann series for ``use_cayley_neumann=True``, `ops.skew.peft_rotation`) and a
legacy ``oft_s`` output scale applied; computed and returned in float64. A pass-through tensor
(``modules_to_save``, a trained bias, a saved embedding base weight) replaces the base's; every
other tensor is the base's. Nothing is folded before it is asked for.

`rotation` gives, per adapted 2-D weight, the exact rotation in decoupling coordinates
(`ops.decouple.BlockRotation`: ``W_i ~ W0 @ P_i`` with ``P_i = blockdiag(cayley(Q))^T``, Q the
canonical blocks of `sources.oft`), so the merge never fits one by Procrustes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import IncompatibleInputsError
from ..ops.decouple import BlockRotation
from ..ops.oft_fold import fold_weight
from ..ops.skew import peft_rotation, vec_to_skew
from .adapted import AdaptedCheckpoint
from .oft import OftAdapter, base_name
from .tensors import TensorReader


class OftCheckpoint(AdaptedCheckpoint):
    """``base`` with ``adapter`` applied, tensor by tensor (module docstring); ``conv1d``: the
    names of weights stored ``(in, out)`` (GPT-2 ``Conv1D``), which an OFT adapter may not target here."""

    def __init__(self, base: TensorReader, adapter: OftAdapter, conv1d: Iterable[str] = ()) -> None:
        super().__init__(base)
        self.adapter = adapter
        self.files = [Path(adapter.label)]
        self._modules = {f"{name}.weight": name for name in adapter.modules}
        self._replaced = {base_name(key): key for key in adapter.passthrough}
        self._check_against_base(set(conv1d))

    def _check_against_base(self, conv1d: set[str]) -> None:
        label = self.adapter.label
        for key, name in self._modules.items():
            mod = self.adapter.modules[name]
            if key not in self.base:
                raise IncompatibleInputsError(
                    "the adapter rotates a tensor the base checkpoint does not have", path=label, tensor=mod.key,
                    hint="Was this adapter trained on another base model?",
                )  # fmt: skip
            if key in conv1d:
                raise IncompatibleInputsError(
                    "OFT on a GPT-2 Conv1D weight (stored (in, out)) is not supported by merge_models",
                    path=label, tensor=mod.key, hint="Merge such adapters with merge_oft_checkpoints.",
                )  # fmt: skip
            shape = self.base.shape(key)
            size = shape[1] if mod.kind == "embedding" and len(shape) == 2 else math.prod(shape[1:])
            if len(shape) < 2 or size % mod.b or mod.r not in (1, size // mod.b):
                raise IncompatibleInputsError(
                    f"{mod.r} OFT block(s) of size {mod.b} do not fit the base weight {key} of shape {shape}",
                    path=label, tensor=mod.key, hint="Was this adapter trained on another base model?",
                )  # fmt: skip
        for name, key in self._replaced.items():
            saved = tuple(self.adapter.tensors.shape(key))
            if name not in self.base or saved != tuple(self.base.shape(name)):
                raise IncompatibleInputsError(
                    f"saved tensor of shape {saved} has no counterpart {name!r} of that shape in the base checkpoint",
                    path=label, tensor=key, hint="Was this adapter trained on another base model?",
                )  # fmt: skip

    def changes(self, key: str) -> bool:
        """Whether the adapter changes tensor ``key``."""
        return key in self._modules or key in self._replaced

    def rotated(self) -> list[str]:
        """The 2-D weights the adapter rotates (those `rotation` answers for)."""
        return [key for key in self._modules if len(self.base.shape(key)) == 2]

    def file_of(self, key: str) -> Path:
        return self.files[0] if self.changes(key) else self.base.file_of(key)

    def rotation(self, key: str) -> BlockRotation | None:
        """The exact rotation of 2-D weight ``key`` in decoupling coordinates; ``None`` where the
        adapter does not rotate it."""
        name = self._modules.get(key)
        if name is None or len(self.base.shape(key)) != 2:
            return None
        mod = self.adapter.modules[name]
        blocks = vec_to_skew(self.adapter.canonical(name), mod.b)
        return BlockRotation(blocks, embedding=mod.kind == "embedding")

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """The fine-tuned tensor ``key`` (float64 where the adapter changes it)."""
        if key in self._replaced:
            tensor = self.adapter.tensors.get(self._replaced[key], check_finite=check_finite).to(torch.float64)
        else:
            tensor = self.base.get(key, check_finite=check_finite)
        name = self._modules.get(key)
        if name is None:
            return tensor
        mod = self.adapter.modules[name]
        adapter = self.adapter
        rotation = peft_rotation(
            vec_to_skew(adapter.canonical(name), mod.b), adapter.use_cayley_neumann, adapter.terms
        )
        scale = adapter.output_scale(name)
        return fold_weight(tensor.to(torch.float64), rotation, mod.kind, out_scale=scale, name=key)

    def get_rows(self, key: str, start: int, stop: int, *, check_finite: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` of `get` (a changed tensor is folded whole, then sliced)."""
        if self.changes(key):
            return self.get(key, check_finite=check_finite)[start:stop]
        return self.base.get_rows(key, start, stop, check_finite=check_finite)
