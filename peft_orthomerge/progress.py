"""Progress bars for long loops (modules, tensors), silenced globally by the CLI's ``--quiet``.

Library code wraps its long loops with `progress(iterable, desc=..., total=...)`; the bar goes
to stderr, is hidden when the loop is short or stderr is not a terminal-like stream, and is
disabled entirely by `set_quiet(True)` or the environment variable ``PEFT_ORTHOMERGE_QUIET=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_QUIET = os.environ.get("PEFT_ORTHOMERGE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Switch all progress bars off (``True``) or back on (``False``)."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Context manager: silence progress bars inside the block, restore the previous state after."""
    previous = _QUIET
    set_quiet(enabled or previous)
    try:
        yield
    finally:
        set_quiet(previous)


def progress(
    iterable: Iterable[T], *, desc: str | None = None, total: int | None = None, unit: str = "it"
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr unless progress is silenced.

    Loops shorter than a few items never show a bar (tqdm's ``delay``: only after 0.5 s).
    """
    if _QUIET:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=0.5, leave=False, dynamic_ncols=True)
