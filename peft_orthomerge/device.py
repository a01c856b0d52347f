"""Where the math runs and in which precision.

Device policy
    ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) and ``"auto"`` (CUDA when available, else CPU).
    Asking for CUDA where there is none is a `ConfigError`, never a torch traceback. Under a
    multi-process launcher (torchrun, ``accelerate launch``) a bare ``"cuda"`` / ``"auto"`` means
    the GPU of this process, ``cuda:<LOCAL_RANK>``.

Output dtype
    The math runs in the dtype a merge's options choose (`plan.options.DecoupleOptions.precision`;
    OFT merges in float32 / float64 by tensor); results are cast back to the base dtype and
    moved to the CPU only when written (`to_output`).
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


def to_output(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a result back to the base dtype on the CPU, contiguous, ready for safetensors."""
    return tensor.detach().to(dtype=dtype).to("cpu").contiguous()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU); call before reading a timer."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
