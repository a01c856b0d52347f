"""Atomic output directories and sharded safetensors writing.

Every output is built in a hidden temporary sibling of the target and renamed into place only
when complete, so an error, a full disk or Ctrl-C never leaves a half-written output, and an
input is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, OutputError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def check_output_dir(
    output_dir: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """Validate ``output_dir`` before any work starts; return it resolved.

    Refused: an output equal to, inside, or containing an input; an existing non-empty directory
    (unless ``overwrite``); an existing file; a parent that cannot be written.
    """
    try:
        out = Path(output_dir).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, symlink loop, unknown user
        raise OutputError(f"invalid output path ({exc})", path=output_dir) from exc
    for inp in inputs:
        src = Path(inp).expanduser()
        if not src.exists():
            continue  # Hub ids live in the cache, never under the output
        src = src.resolve()
        if out == src or src in out.parents:
            raise OutputError("output directory is an input or lies inside one", path=out, hint=f"Input: {src}")
        if out in src.parents:
            raise OutputError("output directory contains an input", path=out, hint=f"Input: {src}")
    if out.exists():
        if not out.is_dir():
            raise OutputError("output path exists and is not a directory", path=out)
        if any(out.iterdir()) and not overwrite:
            raise OutputError(
                "output directory exists and is not empty",
                path=out,
                hint="Pass overwrite=True (CLI: --overwrite) or choose another path.",
            )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError("a parent of the output path is a file, not a directory", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("cannot write to the parent directory", path=parent)
    return out


@contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``output_dir`` atomically.

    On any exception (including ``KeyboardInterrupt``) the temporary directory is removed and
    ``output_dir`` is left as it was. ``OSError`` from the writer becomes `OutputError`.
    """
    out = check_output_dir(output_dir, inputs=inputs, overwrite=overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create the output directory ({exc})", path=out) from exc
    old = None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
    except BaseException as exc:
        if old is not None and not out.exists():
            old.rename(out)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"writing the output failed ({exc}); nothing was written", path=out) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' ``max_shard_size``)."""
    if isinstance(size, bool):
        raise ConfigError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        unit = text[len(digits) :]
        try:
            value = int(float(digits) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ConfigError(f"invalid size {size!r}", hint='Use bytes or a string like "500MB" or "5GB".') from None
    if value <= 0:
        raise ConfigError(f"size must be positive, got {size!r}")
    return value


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardedSafetensorsWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes``, then an index.

    Tensors are buffered until a shard is full, then written and released at once, so memory
    stays bounded by one shard (or one tensor larger than a shard). File names follow transformers: ``model.safetensors`` when one shard
    suffices, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    ``shard_tag`` (e.g. ``"rank0"``) lets several processes write into one directory; their
    shards are renamed and indexed together by `finalize_shards`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        prefix: str = "model",
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        shard_tag: str = "part",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.shard_tag = shard_tag
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise OutputError("tensor written twice", path=self.directory, tensor=name)
        self._names.add(name)
        size = _tensor_nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += size
        self.total_bytes += size
        if self._buffer_bytes >= self.max_shard_bytes:  # full: written now, not held while the next tensor is merged
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        file = f"{self.prefix}.{self.shard_tag}{len(self._written):05d}.safetensors"
        save_file(self._buffer, str(self.directory / file), metadata=self.metadata)
        self._written.append((file, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[tuple[str, list[str]]]:
        """Flush; return ``[(temporary file name, tensor names)]`` for `finalize_shards`."""
        self.flush()
        return self._written


class StreamedSafetensorsFile:
    """One safetensors file written tensor by tensor, in any order, without holding the others.

    The names, dtypes and shapes of every tensor are given up front: the header is written at
    once, and `write` puts each tensor's bytes at its offset as soon as it is computed. The file is
    byte-identical to ``safetensors.torch.save_file`` of the same tensors and ``metadata``: data
    ordered by dtype (safetensors' order, `DTYPES`) then name, no gaps, the compact
    JSON header padded with spaces to a multiple of 8 bytes. (With several metadata keys
    safetensors writes them in hash order; one key, as here, is written the same either way.)
    `close` checks that every tensor was written. Use it as a context manager: an error leaves the
    descriptor closed (the atomic output directory is then discarded).
    """

    # torch dtype -> safetensors' name, in the order its writer places tensors (then by name)
    DTYPES: ClassVar[dict[torch.dtype, str]] = {
        torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
        torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
        torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip

    def __init__(
        self,
        path: str | os.PathLike,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        *,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        rank = {dtype: i for i, dtype in enumerate(self.DTYPES)}
        order = sorted(specs, key=lambda k: (rank[specs[k][0]], k))
        header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for key in order:
            dtype, shape = specs[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": self.DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._layout[key] = (dtype, tuple(shape), offset)
            offset += size
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._pending = set(specs)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pwrite(struct.pack("<Q", len(text)) + text, 0)

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # a regular file may take fewer bytes than asked
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` (its declared dtype and shape) at its place in the file."""
        if name not in self._pending:
            raise OutputError("tensor not declared, or written twice", path=self.path, tensor=name)
        dtype, shape, offset = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise OutputError(
                f"tensor is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}",
                path=self.path,
                tensor=name,
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._pwrite(data.numpy(), self._data_start + offset)
        self._pending.discard(name)

    def close(self) -> None:
        """Close the file; `OutputError` if a declared tensor was not written."""
        os.close(self._fd)
        if self._pending:
            raise OutputError(
                f"{len(self._pending)} declared tensor(s) not written", path=self.path, tensor=min(self._pending)
            )

    def __enter__(self) -> StreamedSafetensorsFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)


def finalize_shards(
    directory: str | os.PathLike,
    parts: list[tuple[str, list[str]]],
    *,
    prefix: str = "model",
    total_bytes: int | None = None,
) -> None:
    """Rename temporary shards to transformers' names and write the index when there are several."""
    directory = Path(directory)
    n = len(parts)
    if n == 0:
        raise OutputError("no tensors were written", path=directory)
    if n == 1:
        (directory / parts[0][0]).rename(directory / f"{prefix}.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(parts, start=1):
        final = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        (directory / file).rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    if total_bytes is None:
        total_bytes = sum((directory / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# Files copied from a base model directory into a folded / merged full-model output.
BASE_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def copy_base_side_files(base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy config and tokenizer files (never weights, never code) from the base; return names copied."""
    copied = []
    for name in BASE_SIDE_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(name)
    return copied
