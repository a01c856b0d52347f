"""Giving freed memory back to the operating system between tensors.

glibc's allocator keeps freed heap memory for reuse, and its dynamic mmap threshold moves tensors
of up to 32 MB from ``mmap`` onto the heap once a large block has been freed. A streaming merge
frees every tensor after writing it, but without a trim the process's resident memory creeps up
to the high-water mark of everything merged so far instead of the current tensor's need.
`release_free_memory` asks glibc to return free heap pages (``malloc_trim(0)``), and
`large_blocks_returned` fixes glibc's mmap threshold at 1 MiB while a streaming merge runs, so
every block of a megabyte or more is mapped and unmapped on its own instead of fragmenting the
heap (it costs a few page faults per large allocation). Elsewhere both do nothing.

glibc has no call that reads the threshold back: on exit the threshold is set to glibc's initial
value (128 KiB). Like any ``mallopt`` call (or the ``MALLOC_MMAP_THRESHOLD_`` environment
variable) this ends glibc's dynamic threshold adjustment for the process; it affects only how
memory is requested from the OS, never a result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20
GLIBC_DEFAULT_MMAP_THRESHOLD_BYTES = 128 * 1024


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


def _set_mmap_threshold(nbytes: int) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))


@contextmanager
def large_blocks_returned() -> Iterator[bool]:
    """While the block runs, glibc maps every allocation of 1 MiB or more on its own and unmaps it
    when freed (yields ``True`` when that could be set); afterwards glibc's initial threshold is
    set back (module docstring). It changes no result."""
    changed = _set_mmap_threshold(MMAP_THRESHOLD_BYTES)
    try:
        yield changed
    finally:
        if changed:
            _set_mmap_threshold(GLIBC_DEFAULT_MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``); a no-op where unavailable."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
