"""Registry of Euclidean merge methods (task arithmetic, TIES, DARE, TSV-M, Fisher-Rao, ...).

A Euclidean merge takes the task vectors of one tensor and returns the merged task vector::

    fn(task_vectors: Sequence[Tensor], weights: Sequence[float], *, base: Tensor | None = None,
       generator: torch.Generator | None = None, **kwargs) -> Tensor

``weights`` are normalised (sum to 1). ``base`` is the base tensor, for methods that act on full
weights rather than task vectors (they return ``merged_full - base``). ``generator`` seeds
stochastic methods (DARE). Methods register themselves with `register_euclidean`; modules that
define methods are imported on first lookup.

A method registered with ``linear=True`` is a weighted sum of per-task terms (task arithmetic;
DARE + TA, whose seeded mask is drawn task by task): it also accepts any *iterable* of task
vectors, consumes it once in order and holds only an accumulator and the current term. Callers
streaming large tensors use `merge_iter`, which passes a generator to linear methods (one task
vector alive at a time) and a list to the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

EuclideanMerge = Callable[..., "torch.Tensor"]

_METHODS: dict[str, EuclideanMerge] = {}
_PROVIDERS = ("peft_orthomerge.ops.euclidean", "peft_orthomerge.ops.fisher_rao")


def register_euclidean(name: str, *, linear: bool = False) -> Callable[[EuclideanMerge], EuclideanMerge]:
    """Register ``fn`` under ``name``; ``linear=True`` declares that it streams an iterable (module doc)."""

    def decorator(fn: EuclideanMerge) -> EuclideanMerge:
        fn.linear = linear
        _METHODS[name] = fn
        return fn

    return decorator


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def euclidean_methods() -> list[str]:
    _load_providers()
    return sorted(_METHODS)


def get_euclidean(name: str) -> EuclideanMerge:
    _load_providers()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown Euclidean merge method {name!r}; valid: {', '.join(sorted(_METHODS))}") from None


def is_linear(fn: EuclideanMerge) -> bool:
    """Whether ``fn`` was registered ``linear=True`` (accepts an iterable, consumed once)."""
    return bool(getattr(fn, "linear", False))


def merge_iter(
    fn: EuclideanMerge, task_vectors: Iterable[torch.Tensor], weights: Sequence[float], **kwargs: Any
) -> torch.Tensor:
    """``fn(task_vectors, weights, **kwargs)`` with ``task_vectors`` produced lazily: a linear method
    consumes the iterable one task vector at a time; any other method gets them all as a list."""
    return fn(task_vectors if is_linear(fn) else list(task_vectors), weights, **kwargs)
