"""One registry of merge methods: the so(b) (rotation) methods and the Euclidean ones.

A method is a function registered with `register_method` (or `register_euclidean`). Its user
parameters are declared by its signature, as in mergekit's ``easy_define``: every keyword-only
argument except the context arguments (`CONTEXT_ARGS`: ``base``, ``generator``, ``norms``, which
the caller supplies) is a parameter, with its annotation and default. Value ranges are declared in
the annotation with `Range` (or `Fraction`)::

    @register_euclidean("ties")
    def ties(task_vectors, weights, *, base=None, generator=None,
             density: Annotated[float, Fraction(low_open=True)] = 0.2, lam: float = 1.0): ...

so that `check_params` validates a parameter mapping from the declarations alone, without a trial
run. Each `MergeMethod` exposes ``name``, ``family`` (``"rotation"`` or ``"euclidean"``),
``orthogonal`` (the result is a rotation), ``linear`` (streams its inputs), ``space`` (how it is
called, below) and ``params`` (`Param`: name, annotation, default, ranges).

Euclidean methods (``space="tensor"``) take the task vectors of one tensor and return the merged
task vector::

    fn(task_vectors: Sequence[Tensor], weights: Sequence[float], *, base: Tensor | None = None,
       generator: torch.Generator | None = None, **params) -> Tensor

``weights`` are normalised (sum to 1). ``base`` is the base tensor, for methods that act on full
weights rather than task vectors (they return ``merged_full - base``). ``generator`` seeds
stochastic methods (DARE). A method registered with ``linear=True`` is a weighted sum of per-task
terms (task arithmetic; DARE + TA, whose seeded mask is drawn task by task): it also accepts any
*iterable* of task vectors, consumes it once in order and holds only an accumulator and the
current term. Callers streaming large tensors use `merge_iter`, which passes a generator to linear
methods (one task vector alive at a time) and a list to the others.

Rotation methods (`peft_orthomerge.ops.so_merge`) act on one module's skew blocks
(``space="skew"``) or exact Cayley rotations (``space="rotation"``); see `so_merge.merge_module`.

Modules that define methods (`PROVIDERS`) are imported on first lookup.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

EuclideanMerge = Callable[..., "torch.Tensor"]
Family = Literal["rotation", "euclidean"]
Space = Literal["tensor", "skew", "rotation"]
FAMILIES: tuple[str, ...] = ("rotation", "euclidean")

CONTEXT_ARGS = frozenset({"base", "generator", "norms"})  # keyword arguments the caller supplies
PROVIDERS = (
    "peft_orthomerge.ops.so_merge",
    "peft_orthomerge.ops.euclidean",
    "peft_orthomerge.ops.fisher_rao",
    "peft_orthomerge.ops.mergekit_compat",
)
REQUIRED = inspect.Parameter.empty  # `Param.default` of a parameter without default


# -- declarations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval of numbers; ``None`` is an unbounded side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"

    def contains(self, value: float) -> bool:
        """Whether the number ``value`` (int or float, compared exactly) lies in the interval."""
        if value != value:  # NaN
            return self.low is None and self.high is None
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: Any) -> float:
        """``float(value)`` if it lies in the interval, else `ConfigError` ``"<name> must be in ..."``."""
        value = float(value)
        if not self.contains(value):
            raise ConfigError(f"{name} must be in {self}, got {value}")
        return value


def Fraction(*, low_open: bool = False, high_open: bool = False) -> Range:
    """The interval from 0 to 1, each end closed unless ``low_open`` / ``high_open``."""
    return Range(0.0, 1.0, low_open=low_open, high_open=high_open)


@dataclass(frozen=True)
class Param:
    """One declared parameter: ``annotation`` is the type (``Annotated`` metadata moved to ``ranges``)."""

    name: str
    annotation: Any
    default: Any = REQUIRED
    ranges: tuple[Range, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type_text(self) -> str:
        """The declared type and ranges in words, e.g. ``float in (0, 1]``."""
        return describe_type(self.annotation) + "".join(f" in {r}" for r in self.ranges)

    def __str__(self) -> str:
        text = f"{self.name}: {self.type_text}"
        return text if self.required else f"{text} = {self.default!r}"

    def check(self, value: Any, method: str) -> Any:
        """``value`` if it has the declared type and lies in the declared ranges, else `ConfigError`."""
        ranges = _match(value, self.annotation)
        if ranges is None:
            raise ConfigError(
                f"parameter {self.name!r} of method {method!r} must be {describe_type(self.annotation)}, got {value!r}"
            )
        for rng in (*self.ranges, *ranges) if value is not None else ():
            if not rng.contains(value):
                raise ConfigError(f"parameter {self.name!r} of method {method!r} must be in {rng}, got {value!r}")
        return value


SEED = Param("seed", int, 0)  # the seed of the generator the decoupled merges build per tensor (residual_kwargs)


def _split_annotated(tp: Any) -> tuple[Any, tuple[Range, ...]]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return base, tuple(m for m in meta if isinstance(m, Range))
    return tp, ()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _match(value: Any, tp: Any) -> tuple[Range, ...] | None:
    """The ranges that apply if ``value`` has type ``tp`` (numbers: ``int`` is a ``float``; ``bool``
    is neither), else ``None``. Unsupported generic annotations accept any value."""
    tp, ranges = _split_annotated(tp)
    if tp is Any or tp is REQUIRED:
        return ranges
    if tp is None or tp is type(None):
        return ranges if value is None else None
    if _is_union(tp):
        for arm in typing.get_args(tp):
            found = _match(value, arm)
            if found is not None:
                return (*ranges, *found)
        return None
    if typing.get_origin(tp) is Literal:
        ok = any(value == a and type(value) is type(a) for a in typing.get_args(tp))
        return ranges if ok else None
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        ok = True
    return ranges if ok else None


def describe_type(tp: Any) -> str:
    """A short reading of an annotation: ``float``, ``float in (0, inf) or None``, ``one of 'a', 'b'``."""
    tp, ranges = _split_annotated(tp)
    if ranges:
        return describe_type(tp) + "".join(f" in {r}" for r in ranges)
    if tp is None or tp is type(None):
        return "None"
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
    return str(tp)


def _read_params(fn: Callable) -> tuple[Param, ...]:
    """The keyword-only arguments of ``fn`` (other than `CONTEXT_ARGS`) as parameters; string
    annotations (``from __future__ import annotations``) are evaluated in ``fn``'s module."""
    params = []
    for arg in inspect.signature(fn).parameters.values():
        if arg.kind is not inspect.Parameter.KEYWORD_ONLY or arg.name in CONTEXT_ARGS:
            continue
        annotation = arg.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, getattr(fn, "__globals__", {}))  # the annotation text of our own source
        base, ranges = _split_annotated(annotation)
        params.append(Param(arg.name, base, arg.default, ranges))
    return tuple(params)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method (module docstring). ``params`` is read from ``fn``'s signature."""

    name: str
    family: Family
    fn: Callable
    orthogonal: bool
    linear: bool
    space: Space

    @cached_property
    def params(self) -> tuple[Param, ...]:
        return _read_params(self.fn)

    def param_names(self) -> list[str]:
        return [p.name for p in self.params]


# -- registration and lookup ----------------------------------------------------------------------
# name -> method function (as before the registry held both families); the declarations of the
# functions registered with `register_method` are in _SPECS. A function placed in _METHODS by hand
# (a test's probe) counts as a Euclidean method, ``linear`` read from its attribute.
_METHODS: dict[str, Callable] = {}
_SPECS: dict[str, MergeMethod] = {}
_ORDER: dict[str, int] = {}  # registration sequence number per name


def _spec(name: str) -> MergeMethod:
    fn = _METHODS[name]
    spec = _SPECS.get(name)
    if spec is not None and spec.fn is fn:
        return spec
    return MergeMethod(name, "euclidean", fn, orthogonal=False, linear=is_linear(fn), space="tensor")


def register_method(
    name: str, *, family: Family, space: Space, orthogonal: bool | None = None, linear: bool = False
) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name`` (a name belongs to one function; re-importing its module is fine).

    ``space``: ``"tensor"`` (Euclidean), ``"skew"`` or ``"rotation"`` (see `so_merge.merge_module`).
    ``orthogonal`` (default ``family == "rotation"``): the result is a rotation. ``linear``: the
    method streams an iterable of task vectors (module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")

    def decorator(fn: Callable) -> Callable:
        for arg in inspect.signature(fn).parameters.values():
            user = arg.kind is inspect.Parameter.KEYWORD_ONLY and arg.name not in CONTEXT_ARGS
            if user and arg.annotation is inspect.Parameter.empty:
                raise TypeError(f"merge method {name!r}: parameter {arg.name!r} needs a type annotation")
        known = _METHODS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"merge method {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        fn.linear = linear
        ortho = family == "rotation" if orthogonal is None else orthogonal
        _SPECS[name] = MergeMethod(name, family, fn, ortho, linear, space)
        _METHODS[name] = fn
        _ORDER.setdefault(name, len(_ORDER))
        return fn

    return decorator


def register_euclidean(name: str, *, linear: bool = False) -> Callable[[EuclideanMerge], EuclideanMerge]:
    """Register a Euclidean method; ``linear=True`` declares that it streams an iterable (module doc)."""
    return register_method(name, family="euclidean", space="tensor", linear=linear)


@functools.cache
def _load_providers() -> None:
    """Import the modules that define methods, once (every lookup calls this)."""
    for module in PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def method_names(family: Family | None = None) -> list[str]:
    """Names of the registered methods (of one ``family``) in listing order: rotation methods first,
    then Euclidean ones, each in the order their modules define them (see `_listing_order`)."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown method family {family!r}; valid: {', '.join(FAMILIES)}")
    _load_providers()
    return [name for name in sorted(_METHODS, key=_listing_order) if family is None or _spec(name).family == family]


def _listing_order(name: str) -> tuple[int, int, int]:
    """Family, then providing module (`PROVIDERS` order), then registration within the module: the
    same order whichever module happened to be imported first."""
    spec = _spec(name)
    module = spec.fn.__module__
    where = PROVIDERS.index(module) if module in PROVIDERS else len(PROVIDERS)
    return FAMILIES.index(spec.family), where, _ORDER.get(name, len(_ORDER))


def get_method(name: str, family: Family | None = None, *, what: str = "merge") -> MergeMethod:
    """The registered method ``name`` (of ``family``); `ConfigError` listing the valid names if none."""
    _load_providers()
    spec = _spec(name) if name in _METHODS else None
    if spec is None or (family is not None and spec.family != family):  # the sorted listing: errors only
        valid = method_names(family)
        raise ConfigError(f"unknown {what} method {name!r}; valid: {', '.join(sorted(valid))}")
    return spec


def check_params(method: str, params: Mapping[str, Any] | None, *, extra: Sequence[Param] = ()) -> dict[str, Any]:
    """Validate ``params`` against the declared parameters of ``method``; return them as a dict.

    Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the method (and,
    for unknown keys, listing the valid parameters). ``extra``: parameters the caller accepts on
    top of the method's own (e.g. `SEED` for the ``residual_kwargs`` of the decoupled merges).
    Missing keys keep their defaults (they are not added to the result).
    """
    spec = get_method(method)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"parameters of method {method!r} must be a mapping, got {type(params).__name__}")
    declared = {p.name: p for p in spec.params}
    declared.update({p.name: p for p in extra if p.name not in declared})
    checked = {}
    for key, value in params.items():
        if key not in declared:
            valid = ", ".join(declared) or "none"
            raise ConfigError(f"unknown parameter {key!r} for method {method!r}; valid: {valid}")
        checked[key] = declared[key].check(value, method)
    missing = [p.name for p in declared.values() if p.required and p.name not in checked]
    if missing:
        raise ConfigError(f"method {method!r} needs parameter{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return checked


# -- Euclidean methods (kept for their callers) ---------------------------------------------------
def euclidean_methods() -> list[str]:
    return sorted(method_names("euclidean"))


def get_euclidean(name: str) -> EuclideanMerge:
    return get_method(name, "euclidean", what="Euclidean merge").fn


def is_linear(fn: EuclideanMerge) -> bool:
    """Whether ``fn`` was registered ``linear=True`` (accepts an iterable, consumed once)."""
    return bool(getattr(fn, "linear", False))


def merge_iter(
    fn: EuclideanMerge, task_vectors: Iterable[torch.Tensor], weights: Sequence[float], **kwargs: Any
) -> torch.Tensor:
    """``fn(task_vectors, weights, **kwargs)`` with ``task_vectors`` produced lazily: a linear method
    consumes the iterable one task vector at a time; any other method gets them all as a list."""
    return fn(task_vectors if is_linear(fn) else list(task_vectors), weights, **kwargs)
