"""In-memory inputs: a state dict as a tensor source, a model's parameter shapes, and the check
that a model given as a plain base carries no PEFT layers.

Every reader of the package (`TensorReader` for files, `DictSource` for adapters already loaded
in a model) offers the `TensorSource` protocol, so adapter parsers and merges never ask where
a tensor came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import IncompatibleInputsError
from .validation import ensure_finite


class TensorSource(Protocol):
    """Named tensors read lazily: ``keys``, ``shape`` (no data read), ``get`` (one tensor, on CPU),
    ``read_into`` (one tensor's values into a caller's buffer, unchecked), ``read_plan`` (such reads
    of several tensors, checked now and run later), ``positional`` (reads are positional file reads,
    which release the GIL while they copy)."""

    files: list[Path]

    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def file_of(self, key: str) -> Path: ...
    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor: ...
    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor: ...
    def read_plan(self, items: Sequence[tuple[str, torch.Tensor]]) -> list[Callable[[], None]]: ...

    positional: bool


class DictSource:
    """A `TensorSource` over an in-memory state dict (adapters already loaded in a `PeftModel`);
    ``label`` stands for the file in error messages; ``device``: where `get` puts a tensor
    (``None``: where it is)."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str, *, device: str | None = None) -> None:
        self._state = dict(state)
        self.label = label
        self.files = [Path(label)]
        self.device = device

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def file_of(self, key: str) -> Path:
        return self.files[0]

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        tensor = self._state[key].detach()
        tensor = tensor if self.device is None else tensor.to(self.device)
        return ensure_finite(tensor, path=self.label, name=key) if check_finite else tensor

    positional = False  # tensors are copied from memory

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy one tensor's values into ``out`` (same number of elements) and return it; no finiteness check."""
        return out.copy_(self._state[key].detach().reshape(out.shape))

    def read_plan(self, items: Sequence[tuple[str, torch.Tensor]]) -> list[Callable[[], None]]:
        """`read_into` of each ``(key, out)`` pair, to be called later in order."""
        return [partial(self.read_into, key, out) for key, out in items]


class ParameterShapes:
    """An in-memory model's parameter names (PEFT's ``base_layer`` wrappers removed) and shapes,
    answering ``in`` and ``shape`` like a `TensorReader` of its checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._shapes = {name.replace(".base_layer.", "."): tuple(p.shape) for name, p in model.named_parameters()}
        self.label = type(model).__name__ + " in memory"

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def tuner_layer_names(model: Any) -> list[str]:
    """Names of the PEFT tuner layers (LoRA, OFT, ...) injected into ``model``'s modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def check_plain_base(model: Any, function: str) -> None:
    """Refuse a model that is not a `PeftModel` but carries PEFT tuner layers.

    PEFT injects its layers in place: after ``merge_oft_adapters(base, ...)`` the ``base`` object
    itself holds OFT layers, and merging again from it would silently start from the adapted
    model. A `PeftModel` is fine (its base weights are known)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return
    layers = tuner_layer_names(model)
    if layers:
        raise IncompatibleInputsError(
            f"the model passed to {function} is not a plain base: PEFT adapter layers were injected into it "
            f"({len(layers)} modules, e.g. {layers[0]}; merge_oft_adapters and get_peft_model modify the model they get)",
            hint="Load a fresh base model, or pass the PeftModel that holds those layers.",
        )
