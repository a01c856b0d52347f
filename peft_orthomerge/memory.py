"""Giving freed memory back to the operating system between tensors.

glibc's allocator keeps freed heap memory for reuse, and its dynamic mmap threshold moves tensors
of up to 32 MB from ``mmap`` onto the heap once a large block has been freed. A streaming merge
frees every tensor after writing it, but without a trim the process's resident memory creeps up
to the high-water mark of everything merged so far instead of the current tensor's need.
`release_free_memory` asks glibc to return free heap pages (``malloc_trim(0)``), and
`return_large_blocks` fixes glibc's mmap threshold at 1 MiB for the process, so every block of a
megabyte or more is mapped and unmapped on its own instead of fragmenting the heap (it costs a
few page faults per large allocation). Elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc_function(name: str):
    """A glibc allocator function, or ``None`` off Linux / off glibc (musl has no ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


def _malloc_trim():
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


@functools.cache
def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (once); ``True`` when it was set.

    Called by the streaming merges (`merge_models`) before their first tensor: peak memory then
    follows what is alive, not the heap's high-water mark. A process-wide setting, like the
    ``MALLOC_MMAP_THRESHOLD_`` environment variable it mirrors; it changes no result."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``); a no-op where unavailable."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
