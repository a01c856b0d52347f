"""A LoRA adapter seen as the full checkpoint it makes of its base, for `merge_models`.

`LoraCheckpoint` answers like a `TensorReader` of the fine-tuned checkpoint: every base tensor
name, with the base's shapes and storage dtypes; an adapted weight is PEFT's exact fold
``W0 + delta`` (`sources.lora.LoraAdapter.expert_weight`: scaling, rsLoRA, patterns, DoRA,
``fan_in_fan_out`` for GPT-2 ``Conv1D`` weights stored ``(in, out)``), computed in float64 and
returned in float64 (never rounded to the base's storage dtype); a saved whole tensor
(``modules_to_save``, a trained bias) is itself; a LoRA bias adds its delta; every other tensor
is the base's. Nothing is folded before it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import IncompatibleInputsError
from .adapted import AdaptedCheckpoint
from .lora import LoraAdapter
from .tensors import TensorReader


class LoraCheckpoint(AdaptedCheckpoint):
    """``base`` with ``adapter`` applied, tensor by tensor (module docstring); ``conv1d``: the
    names of weights stored ``(in, out)``."""

    def __init__(self, base: TensorReader, adapter: LoraAdapter, conv1d: Iterable[str] = ()) -> None:
        super().__init__(base)
        self.adapter = adapter
        self.conv1d = set(conv1d)
        self.files = [Path(adapter.label)]
        self._weights = {f"{key}.weight": key for key in adapter.modules}
        self._biases = {f"{key}.bias": key for key, mod in adapter.modules.items() if "bias" in mod.parts}
        self._check_against_base()

    def _check_against_base(self) -> None:
        for name in [*self._weights, *self._biases, *self.adapter.full]:
            if name not in self.base:
                raise IncompatibleInputsError(
                    "the adapter changes a tensor the base checkpoint does not have",
                    path=self.adapter.label,
                    tensor=name,
                    hint="Was this adapter trained on another base model?",
                )
        for name, key in self.adapter.full.items():
            saved = tuple(self.adapter.source.shape(key))
            if saved != tuple(self.base.shape(name)):
                raise IncompatibleInputsError(
                    f"saved tensor of shape {saved} does not fit the base tensor {name} {self.base.shape(name)} "
                    "(resized vocabulary?)",
                    path=self.adapter.label,
                    tensor=key,
                )

    def changes(self, key: str) -> bool:
        """Whether the adapter changes tensor ``key``."""
        return key in self._weights or key in self._biases or key in self.adapter.full

    def file_of(self, key: str) -> Path:
        return self.files[0] if self.changes(key) else self.base.file_of(key)

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """The fine-tuned tensor ``key`` (float64 where the adapter changes it)."""
        w0 = self.base.get(key, check_finite=check_finite)
        if key in self._weights:
            return self.adapter.expert_weight(self._weights[key], w0, fan_in_fan_out=key in self.conv1d)
        if key in self.adapter.full:
            return self.adapter.full_tensor(key).to(torch.float64)
        if key in self._biases:
            return w0.to(torch.float64) + self.adapter.bias_delta(self._biases[key])
        return w0

    def get_rows(self, key: str, start: int, stop: int, *, check_finite: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` of `get` (a changed tensor is folded whole, then sliced)."""
        if self.changes(key):
            return self.get(key, check_finite=check_finite)[start:stop]
        return self.base.get_rows(key, start, stop, check_finite=check_finite)
