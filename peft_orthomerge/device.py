"""Where the math runs and in which precision.

Device policy
    ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) and ``"auto"`` (CUDA when available, else CPU).
    Asking for CUDA where there is none is a `ConfigError`, never a torch traceback. Under a
    multi-process launcher (torchrun, ``accelerate launch``) a bare ``"cuda"`` / ``"auto"`` means
    the GPU of this process, ``cuda:<LOCAL_RANK>``.

Dtype policy
    Inputs are stored in the base model's dtype (often bf16 / fp16). The math is computed in
    fp32 for 16-bit and fp32 inputs, and in fp64 when the caller asks for accuracy
    (``precise=True``: polar factors, inverse Cayley maps near -1) or when the input already
    is fp64. Results are cast back to the base dtype and moved to the CPU only when written
    (`to_output`).
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("cpu", "cuda", "auto")


def cuda_available() -> bool:
    """True when torch was built with CUDA and sees at least one device."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """Turn a user's device choice into a concrete `torch.device`.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``, a `torch.device`, or ``None``
            (same as ``"cpu"``).

    Returns:
        ``cpu``, or ``cuda:N`` with an explicit index (``LOCAL_RANK`` under a launcher).

    Raises:
        ConfigError: unknown name, CUDA requested but unavailable, or an index out of range.
    """
    if device is None:
        return torch.device("cpu")
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if cuda_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"unknown device {device!r}", hint=f"Use one of {', '.join(DEVICE_CHOICES)} or cuda:N."
        ) from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"unsupported device {device!r}", hint=f"Use one of {', '.join(DEVICE_CHOICES)} or cuda:N.")
    if not cuda_available():
        raise ConfigError(
            f"device {device!r} requested but CUDA is not available",
            hint='Install a CUDA build of torch, or use device="cpu" (or "auto").',
        )
    index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(f"CUDA device index {index} out of range ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def compute_dtype(dtype: torch.dtype, *, precise: bool = False) -> torch.dtype:
    """The dtype the math runs in for inputs stored as ``dtype``.

    16-bit and fp32 inputs compute in fp32; fp64 inputs, or ``precise=True``, in fp64.
    Non-floating dtypes are an error (they are never merged).
    """
    if not dtype.is_floating_point:
        raise ConfigError(f"cannot compute on tensors of dtype {dtype}")
    if precise or dtype == torch.float64:
        return torch.float64
    return torch.float32


def to_compute(tensor: torch.Tensor, device: torch.device, *, precise: bool = False) -> torch.Tensor:
    """Move ``tensor`` to ``device`` in its compute dtype (one copy; non-blocking from pinned memory)."""
    return tensor.to(
        device=device, dtype=compute_dtype(tensor.dtype, precise=precise), non_blocking=tensor.is_pinned()
    )


def to_output(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a result back to the base dtype on the CPU, contiguous, ready for safetensors."""
    return tensor.detach().to(dtype=dtype).to("cpu").contiguous()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU); call before reading a timer."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
