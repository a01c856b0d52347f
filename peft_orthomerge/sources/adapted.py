"""The shared part of the virtual checkpoints an adapter makes of its base (`LoraCheckpoint`,
`OftCheckpoint`): the tensor names, shapes and dtypes are the base checkpoint's."""

from __future__ import annotations

import torch

from .tensors import TensorReader


class AdaptedCheckpoint:
    """The base checkpoint's names, shapes and dtypes; subclasses supply the adapted values."""

    def __init__(self, base: TensorReader) -> None:
        self.base = base

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)
