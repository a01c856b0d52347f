"""Giving freed memory back to the operating system between tensors.

glibc's allocator keeps freed heap memory for reuse, and its dynamic mmap threshold moves tensors
of up to 32 MB from ``mmap`` onto the heap once a large block has been freed. A streaming merge
frees every tensor after writing it, but without a trim the process's resident memory creeps up
to the high-water mark of everything merged so far instead of the current tensor's need.
`release_free_memory` asks glibc to return free heap pages (``malloc_trim(0)``); elsewhere it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``); a no-op where unavailable."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
