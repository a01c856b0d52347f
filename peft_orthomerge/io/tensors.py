"""Lazy, validated tensor reading from safetensors files (single or sharded).

Tensors are read one at a time with `safetensors.safe_open`; nothing is loaded until asked for.
Pickle files are refused unless the caller opts in, and then only ``torch.load(weights_only=True)``
is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError, NumericalError, UnsafeInputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PACKED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")  # safetensors dtypes of less than one byte per value
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


def _read_weight_map(index: Path) -> dict[str, str]:
    """Parse ``<stem>.safetensors.index.json``; return its non-empty ``weight_map`` (tensor -> file name)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"invalid shard index ({type(exc).__name__}: {exc})", path=index) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items())
    ):
        raise InputError(
            "invalid shard index: expected a non-empty 'weight_map' of tensor names to file names", path=index
        )
    return weight_map


class TensorReader:
    """Read-only, lazy view of the tensors in a set of safetensors files (or an opted-in pickle).

    ``keys()``, ``shape()`` and ``dtype()`` read headers only; ``get()`` loads one tensor.
    Errors name the file and the tensor.
    """

    def __init__(self, files: list[Path], *, pickle_state: dict[str, torch.Tensor] | None = None) -> None:
        self.files = list(files)
        self._pickle = pickle_state
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        if pickle_state is not None:
            for key in pickle_state:
                self._where[key] = self.files[0]
            return
        for file in self.files:
            handle = self._open(file)
            for key in handle.keys():
                if key in self._where:
                    raise InputError(f"tensor appears in two files ({self._where[key].name})", path=file, tensor=key)
                self._where[key] = file

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, file: str | Path, *, allow_pickle: bool = False) -> "TensorReader":
        file = Path(file)
        if not file.is_file():
            raise InputError("file not found", path=file)
        if file.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeInputError(
                    "pickle checkpoints are not loaded by default (they can execute code)",
                    path=file,
                    hint="Convert it to safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True).",
                )
            return cls([file], pickle_state=load_pickle_weights(file))
        return cls([file])

    @classmethod
    def from_dir(
        cls, directory: str | Path, stem: str, *, allow_pickle: bool = False
    ) -> "TensorReader":
        """Open ``<stem>.safetensors``, a sharded ``<stem>.safetensors.index.json``, or (opt-in) ``<stem>.bin``.

        ``stem`` is e.g. ``"adapter_model"`` or ``"model"``.
        """
        directory = Path(directory)
        single = directory / f"{stem}.safetensors"
        index = directory / f"{stem}.safetensors.index.json"
        if single.is_file():
            return cls.from_file(single)
        if index.is_file():
            weight_map = _read_weight_map(index)
            files = sorted({directory / name for name in weight_map.values()})
            for file in files:
                if file.parent.resolve() != directory.resolve():
                    raise InputError("shard index points outside its directory", path=index, tensor=str(file))
                if not file.is_file():
                    raise InputError("shard listed in the index is missing", path=file)
            reader = cls(files)
            for key, name in weight_map.items():
                if reader._where.get(key) != directory / name:
                    raise InputError(f"shard index places the tensor in {name}, which does not hold it", path=index, tensor=key)
            return reader
        shards = sorted(directory.glob(f"{stem}-*.safetensors"))
        if shards:
            return cls(shards)
        for suffix in PICKLE_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return cls.from_file(candidate, allow_pickle=allow_pickle)
        raise InputError(f"no {stem}.safetensors (or shards) found", path=directory)

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                if file.stat().st_size == 0:
                    raise InputError("file is empty", path=file)
                handle = safe_open(str(file), framework="pt", device="cpu")
            except InputError:
                raise
            except Exception as exc:  # SafetensorError, OSError, ...
                raise InputError(f"not a readable safetensors file ({exc})", path=file) from exc
            self._handles[file] = handle
        return handle

    # -- queries ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickle is not None:
            return tuple(self._pickle[key].shape)
        file = self._where[key]
        try:
            info = self._open(file).get_slice(key)
            dtype, shape = info.get_dtype(), tuple(info.get_shape())
        except Exception as exc:
            raise InputError(f"cannot read tensor header ({exc})", path=file, tensor=key) from exc
        if dtype in _PACKED_DTYPES:  # torch packs these: its tensor's shape differs from the header's
            raise InputError(f"unsupported sub-byte dtype {dtype}", path=file, tensor=key)
        return shape

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor on CPU; NaN/Inf raise `NumericalError` unless ``check_finite=False``."""
        if key not in self._where:
            raise InputError("tensor not found", path=self.files[0] if self.files else None, tensor=key)
        file = self._where[key]
        if self._pickle is not None:
            tensor = self._pickle[key]
        else:
            shape = self.shape(key)
            try:
                tensor = self._open(file).get_tensor(key)
            except Exception as exc:
                raise InputError(f"cannot read tensor ({exc})", path=file, tensor=key) from exc
            if tuple(tensor.shape) != shape:
                raise InputError(f"tensor shape {tuple(tensor.shape)} differs from its header {shape}", path=file, tensor=key)
        if check_finite:
            ensure_finite(tensor, path=file, name=key)
        return tensor

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)
