"""Progress bars for long loops (modules, tensors), silenced globally by the CLI's ``--quiet``.

Library code wraps its long loops with `progress(iterable, desc=..., total=...)`; the bar goes
to stderr, is hidden when the loop is short or stderr is not a terminal-like stream, and is
disabled entirely by `set_quiet(True)` or the environment variable ``PEFT_ORTHOMERGE_QUIET=1``.

The progress bars of huggingface_hub and transformers are process-wide switches of those
libraries; `library_progress_bars_off` turns them off for a block and restores them after.
"""

from __future__ import annotations

import importlib
import os
import warnings
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


@contextmanager
def library_progress_bars_off(enabled: bool = True) -> Iterator[None]:
    """Inside the block (if ``enabled``), huggingface_hub's and transformers' progress bars are off;
    on exit each library's switch (for the hub, also its per-group states) is what it was before."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (its name is shadowed)
    hub_states = dict(hub_tqdm.progress_bar_states)
    transformers_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also switches the hub's bars off
    hub_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS overrides a switch
            warnings.simplefilter("ignore")
            (hf_logging.enable_progress_bar if transformers_on else hf_logging.disable_progress_bar)()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_states)


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


LIBRARY_MODULES = r"(transformers|peft|huggingface_hub|accelerate|torch)(\..*)?$"


@contextmanager
def library_output_quiet(enabled: bool = True) -> Iterator[None]:
    """Inside the block (if ``enabled``): the progress bars of huggingface_hub and transformers are
    off, transformers' logging shows errors only, and warnings raised by transformers, PEFT, the hub,
    accelerate or torch are ignored (ours stay). On exit everything is as it was (the CLI's default;
    ``--verbose`` keeps them)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        with library_progress_bars_off(True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
