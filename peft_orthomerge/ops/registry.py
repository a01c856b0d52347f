"""Registry of Euclidean merge methods (task arithmetic, TIES, DARE, TSV-M, Fisher-Rao, ...).

A Euclidean merge takes the task vectors of one tensor and returns the merged task vector::

    fn(task_vectors: Sequence[Tensor], weights: Sequence[float], *, base: Tensor | None = None,
       generator: torch.Generator | None = None, **kwargs) -> Tensor

``weights`` are normalised (sum to 1). ``base`` is the base tensor, for methods that act on full
weights rather than task vectors (they return ``merged_full - base``). ``generator`` seeds
stochastic methods (DARE). Methods register themselves with `register_euclidean`; modules that
define methods are imported on first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..errors import ConfigError

EuclideanMerge = Callable[..., "torch.Tensor"]  # noqa: F821

_METHODS: dict[str, EuclideanMerge] = {}
_PROVIDERS = ("peft_orthomerge.ops.euclidean", "peft_orthomerge.ops.fisher_rao")


def register_euclidean(name: str) -> Callable[[EuclideanMerge], EuclideanMerge]:
    def decorator(fn: EuclideanMerge) -> EuclideanMerge:
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
