"""Exception hierarchy. Every error the library raises on purpose subclasses `OrthoMergeError`.

Messages follow one pattern so that the CLI can print them as a single line:
``<file>: <tensor>: <what is wrong>. <what to do>`` with the parts that are unknown left out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from os import PathLike
from typing import TypeVar

_Fn = TypeVar("_Fn", bound=Callable)


class OrthoMergeError(Exception):
    """Base class of all errors raised by peft-orthomerge.

    Args:
        message: what is wrong.
        path: the file or directory at fault, if any.
        tensor: the tensor (or module) at fault, if any.
        hint: what the user can do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._format())

    def naming(self, tensor: str) -> OrthoMergeError:
        """The same error (type, file, message, hint) naming ``tensor``."""
        return type(self)(self.message, path=self.path, tensor=tensor, hint=self.hint)

    def _format(self) -> str:
        parts = [p for p in (self.path, self.tensor) if p]
        text = ": ".join([*parts, self.message])
        if self.hint:
            text = f"{text.rstrip('.')}. {self.hint}"
        return " ".join(text.split())  # always one line


class InputError(OrthoMergeError):
    """An input (adapter, checkpoint, recipe) is missing, unreadable or malformed."""


class UnsafeInputError(InputError):
    """An input would need unsafe loading (pickle) or remote code; refused by default."""


class IncompatibleInputsError(InputError):
    """Inputs do not fit each other or the base model (shapes, block sizes, adapter types)."""


class NumericalError(OrthoMergeError):
    """Non-finite values, or a map (inverse Cayley, polar factor) that is undefined at the input."""


class ConfigError(OrthoMergeError):
    """Invalid arguments: weights, method names, options."""


class OutputError(OrthoMergeError):
    """The output location cannot be used (exists, inside an input, not writable, write failed)."""


@contextlib.contextmanager
def tensor_named(name: str) -> Iterator[None]:
    """Inside this block, an `OrthoMergeError` that names no tensor (the math raising it does not
    know which tensor it works on) is raised again naming ``name``."""
    try:
        yield
    except OrthoMergeError as exc:
        if exc.tensor is not None:
            raise
        raise exc.naming(name) from exc


def names_tensor(fn: _Fn) -> _Fn:
    """Decorate a function whose first argument is the name of the tensor it merges: its body runs
    in `tensor_named` of that name."""

    @functools.wraps(fn)
    def named(name: str, *args, **kwargs):
        with tensor_named(name):
            return fn(name, *args, **kwargs)

    return named  # type: ignore[return-value]
