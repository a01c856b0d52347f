"""One safetensors file opened for reading: its header parsed and checked entry by entry, and
positional reads of its bytes (``os.preadv``, vectored: one system call fills several buffers).

The file is also validated by ``safetensors.safe_open`` when opened (whose handle serves header
queries and the fallback reads of `sources.tensors.TensorReader`); this module parses the header
once more for the absolute byte offsets of every tensor. safetensors stores little-endian bytes, so
positional reads are right only on a little-endian machine (`POSITIONAL_READS`).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import struct
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError

PACKED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")  # safetensors dtypes of less than one byte per value
_DTYPE_NAMES = {  # safetensors dtype -> torch attribute (those missing from this torch are left out)
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
# Positional reads give the file's bytes as they are: right only where the machine is little-endian.
POSITIONAL_READS = sys.byteorder == "little" and hasattr(os, "preadv")
IOV_MAX = 1024  # buffers per vectored read (Linux's UIO_MAXIOV)


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's header entry; ``begin``/``end`` are absolute byte offsets in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_entry(file: Path, key: str, info: object, data_start: int, size: int) -> HeaderEntry:
    """Validate one header entry: well formed, inside the file, as many bytes as dtype and shape need."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        ok = (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and type(begin) is int
            and type(end) is int
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise InputError("malformed header entry: needs dtype, shape and data_offsets", path=file, tensor=key)
    if not 0 <= begin <= end or data_start + end > size:
        raise InputError(
            f"data_offsets [{begin}, {end}] fall outside the file's {size - data_start} data bytes",
            path=file,
            tensor=key,
        )
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is not None and end - begin != math.prod(shape) * torch_dtype.itemsize:
        raise InputError(
            f"a {dtype} tensor of shape {shape} needs {math.prod(shape) * torch_dtype.itemsize} bytes, "
            f"its data_offsets give {end - begin}",
            path=file,
            tensor=key,
        )
    return HeaderEntry(dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsFile:
    """One open safetensors file.

    ``handle`` is its ``safe_open`` handle (validation at open, keys, fallback reads; its memory map
    is never touched by positional reads); ``entries`` its parsed header; ``fd`` (where positional
    reads are used) a plain read-only descriptor, closed when the shard is garbage-collected.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            size = file.stat().st_size
            if size == 0:
                raise InputError("file is empty", path=file)
            self.handle = safe_open(str(file), framework="pt", device="cpu")
            with open(file, "rb") as fh:
                prefix = fh.read(8)
                (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
                if length > size - 8:
                    raise InputError(f"header length {length} runs past the end of the file", path=file)
                header = json.loads(fh.read(length))
            if POSITIONAL_READS:
                self.fd = os.open(file, os.O_RDONLY)
                weakref.finalize(self, os.close, self.fd)
        except InputError:
            raise
        except Exception as exc:  # SafetensorError, OSError, ValueError (JSON), ...
            raise InputError(f"not a readable safetensors file ({type(exc).__name__}: {exc})", path=file) from exc
        if not isinstance(header, dict):
            raise InputError("header is not a JSON object", path=file)
        self.entries = {
            key: parse_entry(file, key, info, 8 + length, size)
            for key, info in header.items()
            if key != "__metadata__"
        }

    def read_into(self, outs: Sequence[torch.Tensor], offset: int, keys: Sequence[str]) -> None:
        """Fill the contiguous uint8 tensors ``outs``, in order, with the file's bytes from ``offset`` on:
        one vectored read (``preadv``) for all of them, repeated from where it stopped when it returns
        short. ``keys[i]`` names ``outs[i]``'s tensor in errors."""
        named = [(out, key) for out, key in zip(outs, keys) if out.numel()]
        keys = [key for _, key in named]
        views = [memoryview((ctypes.c_char * out.numel()).from_address(out.data_ptr())).cast("B") for out, _ in named]
        ends = list(itertools.accumulate(len(v) for v in views))
        total, done, first = (ends[-1] if ends else 0), 0, 0
        while done < total:  # one call reads at most ~2 GiB on Linux; a regular file may also return short
            while ends[first] <= done:
                first += 1
            skip = done - (ends[first] - len(views[first]))
            pending = [views[first][skip:], *views[first + 1 : first + IOV_MAX]]
            try:
                got = os.preadv(self.fd, pending, offset + done)
            except OSError as exc:
                raise InputError(f"cannot read tensor data ({exc})", path=self.file, tensor=keys[first]) from exc
            if not got:
                raise InputError(
                    f"file ends {total - done} bytes short of the data its header promises (truncated?)",
                    path=self.file,
                    tensor=keys[first],
                )
            done += got
