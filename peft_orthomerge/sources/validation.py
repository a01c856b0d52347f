"""What is refused while reading inputs: non-finite tensors, and pickle beyond ``weights_only``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, NumericalError, UnsafeInputError
from ..ops.finite import all_finite


def ensure_finite(tensor: torch.Tensor, *, path: str | Path | None, name: str) -> torch.Tensor:
    """Raise `NumericalError` naming the file and tensor if ``tensor`` holds NaN or Inf
    (`ops.finite.all_finite`: one reduction, every float and complex dtype)."""
    if not all_finite(tensor):
        raise NumericalError("tensor contains NaN or Inf values", path=path, tensor=name)
    return tensor


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle checkpoint with ``torch.load(weights_only=True)`` (no arbitrary code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused object), RuntimeError (corrupt archive), ...
        raise UnsafeInputError(
            f"torch.load(weights_only=True) refused the pickle checkpoint ({type(exc).__name__}): "
            "it is corrupt or holds objects other than tensors",
            path=path,
            hint="Convert it to safetensors in an environment you trust.",
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError("pickle checkpoint is not a flat dict of tensor names to tensors", path=path)
    return state
