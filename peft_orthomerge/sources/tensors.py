"""Lazy, validated tensor reading from safetensors files (single or sharded).

Each file is validated when opened by ``safetensors.safe_open`` (header, offsets, sizes) and its
header is parsed once more for the byte offsets of every tensor (`safetensors_file.SafetensorsFile`).
Tensor data is then read with positional file reads (``os.preadv``) straight into a fresh tensor
(or the caller's buffer: `TensorReader.read_into`, `TensorReader.read_plan`): no memory map is touched,
so a tensor read and released leaves nothing resident. (Reading through ``safe_open``'s memory
map keeps every page touched counted in this process's RSS for as long as the file is open, so
streaming several checkpoints would grow RSS to the size of all of them.) ``get_rows`` reads a
range of rows along dim 0 without reading the rest. safetensors stores little-endian bytes; on a
big-endian machine, or a platform without ``os.preadv``, and for a dtype not mapped below, reads
fall back to ``safe_open``'s ``get_tensor``.

Pickle files are refused unless the caller opts in, and then only ``torch.load(weights_only=True)``
is used.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch

from ..errors import InputError, UnsafeInputError
from .safetensors_file import DTYPES, PACKED_DTYPES, POSITIONAL_READS, HeaderEntry, SafetensorsFile
from .validation import ensure_finite, load_pickle_weights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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

    ``keys()``, ``shape()`` and ``dtype()`` read headers only; ``get()`` loads one tensor and
    ``get_rows()`` a range of its rows along dim 0, each into fresh memory owned by the caller
    (positional file reads, no memory map: nothing stays resident once the tensor is released).
    Errors name the file and the tensor.
    """

    def __init__(self, files: list[Path], *, pickle_state: dict[str, torch.Tensor] | None = None) -> None:
        self.files = list(files)
        self._pickle = pickle_state
        self._shards: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        self._entries: dict[str, HeaderEntry] = {}  # every safetensors key's header entry
        if pickle_state is not None:
            for key in pickle_state:
                self._where[key] = self.files[0]
            return
        for file in self.files:
            shard = self._shard(file)
            keys = shard.handle.keys()
            if set(keys) != set(shard.entries):
                raise InputError("header keys disagree with the safetensors library's reading of them", path=file)
            for key in keys:
                if key in self._where:
                    raise InputError(f"tensor appears in two files ({self._where[key].name})", path=file, tensor=key)
                self._where[key] = file
                self._entries[key] = shard.entries[key]

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, file: str | Path, *, allow_pickle: bool = False) -> TensorReader:
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
    def from_dir(cls, directory: str | Path, stem: str, *, allow_pickle: bool = False) -> TensorReader:
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
                    raise InputError(
                        f"shard index places the tensor in {name}, which does not hold it", path=index, tensor=key
                    )
            return reader
        shards = sorted(directory.glob(f"{stem}-*.safetensors"))
        if shards:
            return cls(shards)
        for suffix in PICKLE_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return cls.from_file(candidate, allow_pickle=allow_pickle)
        raise InputError(f"no {stem}.safetensors (or shards) found", path=directory)

    def _shard(self, file: Path) -> SafetensorsFile:
        shard = self._shards.get(file)
        if shard is None:
            shard = self._shards[file] = SafetensorsFile(file)
        return shard

    def _open(self, file: Path):
        """The ``safe_open`` handle of ``file`` (header queries; reading through it maps pages)."""
        return self._shard(file).handle

    def _locate(self, key: str) -> Path:
        if key not in self._where:
            raise InputError("tensor not found", path=self.files[0] if self.files else None, tensor=key)
        return self._where[key]

    def _entry(self, key: str) -> HeaderEntry:
        entry = self._entries.get(key)
        if entry is None:
            self._locate(key)  # a key of no file: "tensor not found"
        if entry.dtype in PACKED_DTYPES:  # torch packs these: its tensor's shape differs from the header's
            raise InputError(f"unsupported sub-byte dtype {entry.dtype}", path=self._where[key], tensor=key)
        return entry

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
        """The tensor's shape from the header (no data read)."""
        if self._pickle is not None:
            self._locate(key)
            return tuple(self._pickle[key].shape)
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """The tensor's torch dtype from the header (no data read, except for a dtype not mapped here)."""
        if self._pickle is not None:
            self._locate(key)
            return self._pickle[key].dtype
        entry = self._entry(key)
        if entry.dtype not in DTYPES:  # left to safetensors, which knows it: one read
            return self.get(key, check_finite=False).dtype
        return DTYPES[entry.dtype]

    def storage_dtype(self, key: str) -> str:
        """The dtype as stored: the safetensors header's name (``"BF16"``, ``"F8_E4M3"``, ...), or the
        torch dtype's name for a pickle checkpoint. No data read."""
        file = self._locate(key)
        if self._pickle is not None:
            return str(self._pickle[key].dtype).removeprefix("torch.")
        return self._shard(file).entries[key].dtype

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor on CPU; NaN/Inf raise `NumericalError` unless ``check_finite=False``."""
        file = self._locate(key)
        if self._pickle is not None:
            tensor = self._pickle[key]
        else:
            entry = self._entry(key)
            if POSITIONAL_READS and entry.dtype in DTYPES:
                tensor = self._read(key, entry, entry.begin, entry.end, entry.shape)
            else:
                try:
                    tensor = self._open(file).get_tensor(key)
                except Exception as exc:
                    raise InputError(f"cannot read tensor ({exc})", path=file, tensor=key) from exc
                if tuple(tensor.shape) != entry.shape:
                    raise InputError(
                        f"tensor shape {tuple(tensor.shape)} differs from its header {entry.shape}",
                        path=file,
                        tensor=key,
                    )
        if check_finite:
            ensure_finite(tensor, path=file, name=key)
        return tensor

    def get_rows(self, key: str, start: int, stop: int, *, check_finite: bool = True) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0 of one tensor, as a fresh contiguous CPU tensor.

        Equal to ``get(key)[start:stop]`` but reads only those rows' bytes. Needs
        ``0 <= start <= stop <= shape[0]`` (no negative indices); a 0-d tensor or rows out of
        range raise `InputError`; NaN/Inf in the rows read raise `NumericalError` unless
        ``check_finite=False``.
        """
        file = self._locate(key)
        shape = self.shape(key)
        start, stop = operator.index(start), operator.index(stop)
        if not shape:
            raise InputError("a 0-d tensor has no rows to read", path=file, tensor=key)
        if not 0 <= start <= stop <= shape[0]:
            raise InputError(
                f"rows {start}:{stop} are not a range within the tensor's {shape[0]} rows", path=file, tensor=key
            )
        if self._pickle is not None:
            tensor = self._pickle[key][start:stop].clone(memory_format=torch.contiguous_format)
        else:
            entry = self._entry(key)
            if POSITIONAL_READS and entry.dtype in DTYPES:
                row_bytes = math.prod(shape[1:]) * DTYPES[entry.dtype].itemsize
                lo, hi = entry.begin + start * row_bytes, entry.begin + stop * row_bytes
                tensor = self._read(key, entry, lo, hi, (stop - start, *shape[1:]))
            else:
                try:
                    tensor = self._open(file).get_slice(key)[start:stop].clone()
                except Exception as exc:
                    raise InputError(f"cannot read tensor rows ({exc})", path=file, tensor=key) from exc
        if check_finite:
            ensure_finite(tensor, path=file, name=key)
        return tensor

    @property
    def positional(self) -> bool:
        """Whether tensor data is read by positional file reads (which release the GIL while they copy)."""
        return POSITIONAL_READS and self._pickle is None

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor's stored values into ``out`` and return it; no finiteness check.

        ``out`` must be a contiguous CPU tensor of the stored dtype with as many elements as the
        tensor (its shape may differ: values in row-major order). With positional reads the file's
        bytes go straight into ``out``'s memory, so a caller that reuses one buffer reads without
        allocating; otherwise the tensor is read with `get` and copied.
        """
        for read in self.read_plan([(key, out)]):
            read()
        return out

    def read_plan(self, items: Sequence[tuple[str, torch.Tensor]]) -> list[Callable[[], None]]:
        """The reads that fill each ``(key, out)`` pair's buffer as `read_into` does, checked now, to be
        called later in order (by another thread, for instance: a positional read releases the GIL
        while it copies, and the calls do little else). With positional reads, each run of
        consecutive pairs whose tensors lie back to back in one file is one vectored system call into
        all of its buffers (so reading the modules of a layer in file order costs one call per file)."""
        reads: list[Callable[[], None]] = []
        run: list[tuple[str, torch.Tensor]] = []
        run_file, run_end = None, -1
        for key, out in items:
            entry = None if not self.positional else self._entry(key)
            if entry is None or entry.dtype not in DTYPES:
                reads += self._run_read(run_file, run)
                run, run_file = [], None
                reads.append(partial(self._copy_into, key, out))
                continue
            if out.dtype != DTYPES[entry.dtype] or out.numel() != math.prod(entry.shape) or not out.is_contiguous():
                raise ValueError(
                    f"read_into: {key} is {entry.dtype} {entry.shape}, out is {out.dtype} {tuple(out.shape)}"
                )
            if entry.begin == entry.end:  # nothing to read: a run goes on across an empty tensor
                continue
            file = self._where[key]
            if file != run_file or entry.begin != run_end:
                reads += self._run_read(run_file, run)
                run, run_file = [], file
            run.append((key, out))
            run_end = entry.end
        return reads + self._run_read(run_file, run)

    def _run_read(self, file: Path | None, run: list[tuple[str, torch.Tensor]]) -> list[Callable[[], None]]:
        """The one read of tensors stored back to back in ``file`` (checked by `read_plan`), if any."""
        if not run:
            return []
        outs = [out.view(torch.uint8).view(-1) for _, out in run]
        return [partial(self._shard(file).read_into, outs, self._entry(run[0][0]).begin, [key for key, _ in run])]

    def _copy_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self.get(key, check_finite=False).reshape(out.shape))

    def _read(self, key: str, entry: HeaderEntry, lo: int, hi: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Bytes ``lo:hi`` of the tensor's file, read into fresh memory and viewed as ``shape``."""
        raw = torch.empty(hi - lo, dtype=torch.uint8)
        self._shard(self._where[key]).read_into([raw], lo, [key])
        dtype = DTYPES[entry.dtype]
        if dtype is torch.bool and raw.numel() and int(raw.max()) > 1:
            raise InputError("BOOL tensor holds bytes other than 0 and 1", path=self._where[key], tensor=key)
        return raw.view(dtype).reshape(shape)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)
