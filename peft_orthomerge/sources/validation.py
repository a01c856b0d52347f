"""What is refused while reading inputs: non-finite tensors, and pickle beyond ``weights_only``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, NumericalError, UnsafeInputError

_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ensure_finite(tensor: torch.Tensor, *, path: str | Path | None, name: str) -> torch.Tensor:
    """Raise `NumericalError` naming the file and tensor if ``tensor`` holds NaN or Inf.

    Float and complex dtypes are checked; those ``torch.isfinite`` does not implement (some
    float8 variants) are checked after an exact upcast to float32.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or not tensor.numel():
        return tensor
    check = tensor if tensor.dtype in _ISFINITE_DTYPES or tensor.is_complex() else tensor.float()
    if check.is_complex():
        finite = bool(torch.isfinite(check).all())
    else:  # min and max in one reduction, no temporary: NaN propagates into both, Inf shows in one
        finite = bool(torch.isfinite(torch.stack(torch.aminmax(check))).all())
    if not finite:
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
