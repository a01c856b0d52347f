"""Merge options, validated once: frozen dataclasses checked in ``__post_init__``.

The Python API, the recipes and the CLI build these from their arguments; everything after them
(plans, merges, sinks) trusts their values. `OftOptions` describes a merge of OFT adapters in
so(b); `DecoupleOptions` a merge by orthogonal-residual decoupling (LoRA adapters, full
checkpoints): the Procrustes target, the Euclidean residual method and its parameters, the polar
solver and the compute dtype.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device import resolve_device
from ..errors import ConfigError
from ..ops.decouple import TARGETS
from ..ops.procrustes import check_solver
from ..ops.registry import SEED, check_params, euclidean_methods, get_method
from ..ops.so_merge import get_so_method, so_methods

CAYLEY_CHOICES = ("auto", "exact", "neumann")
GRANULARITIES = ("module", "block")
ORTHOGONALITY_BLOCKS = 4  # default: blocks per module whose orthogonality error the report measures
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
OFT_EXPORTS = ("adapter", "memory", "folded")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")


def _finite_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {number}")
    return number


def _check_oft_method(method: str, export: str) -> bool:
    """True for a Euclidean baseline (merges folded task vectors); `ConfigError` for an unknown
    method, or one whose result cannot be stored as ``export``."""
    if method in so_methods():
        if not get_so_method(method).orthogonal and export != "folded":
            raise ConfigError(
                f"method {method!r} does not produce a rotation, so it cannot be stored as an OFT adapter",
                hint="Use it with fold_into=<base model> (folded export), or choose 'orthomerge', 'mean_q' or 'product_r'.",
            )
        return False
    if method in euclidean_methods():
        if export != "folded":
            raise ConfigError(
                f"Euclidean method {method!r} acts on folded weights and cannot give an OFT adapter",
                hint="Pass fold_into=<base model> to merge_oft_checkpoints.",
            )
        return True
    valid = ", ".join([*so_methods(), *euclidean_methods()])
    raise ConfigError(f"unknown method {method!r}; valid: {valid}")


@dataclass(frozen=True)
class OftOptions:
    """How OFT adapters are merged and exported.

    ``method``: an so(b) method (``orthomerge``, ``mean_q``, ``product_r``, ``karcher``; ``mean_r``
    folded only) or a Euclidean baseline on folded weights; ``granularity``: over what the
    magnitude correction takes norms (``module`` or ``block``); ``cayley``: the merged adapter's
    ``use_cayley_neumann`` (``auto`` keeps the inputs' common flag); ``scale`` multiplies the
    merged skew blocks; ``export``: ``adapter`` (files), ``memory`` (loaded into a model) or
    ``folded`` (full model); ``orthogonality_blocks``: per module, how many merged blocks (largest
    norm first) the report's orthogonality error is measured on (``None``: every block).
    """

    method: str = "orthomerge"
    granularity: str = "module"
    cayley: str = "auto"
    scale: float = 1.0
    export: str = "adapter"
    device: str = "cpu"
    orthogonality_blocks: int | None = ORTHOGONALITY_BLOCKS
    euclidean: bool = field(init=False)

    def __post_init__(self) -> None:
        _check_choice("export", self.export, OFT_EXPORTS)
        object.__setattr__(self, "euclidean", _check_oft_method(self.method, self.export))
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("cayley option", self.cayley, CAYLEY_CHOICES)
        object.__setattr__(self, "scale", _finite_float("scale", self.scale))
        blocks = self.orthogonality_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ConfigError(f"orthogonality_blocks must be a positive integer or None (every block), got {blocks!r}")
        object.__setattr__(self, "device", str(resolve_device(self.device)))  # "auto" -> cuda:N or cpu


@dataclass(frozen=True)
class DecoupleOptions:
    """How orthogonal-residual decoupling merges one set of experts.

    ``target``: ``"global"`` (Procrustes towards ``W_i``), ``"conflict"`` (towards the conflicting
    rows only) or ``None`` (no rotation: the plain Euclidean merge); ``residual``: the Euclidean
    method for residuals (and for every tensor that is not decoupled); ``residual_kwargs``: its
    parameters, plus ``seed`` (seeds stochastic methods per tensor); ``solver``: the polar solver;
    ``precision``: the compute dtype (``float64``, the reference, or ``float32``: decoupled weights
    too ill-conditioned for it are computed in float64, `ops.precision`).
    """

    target: str | None = "global"
    residual: str = "ta"
    residual_kwargs: Mapping[str, Any] | None = None
    solver: str = "auto"
    precision: str = "float64"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; valid: 'global', 'conflict', None")
        check_solver(self.solver)
        get_method(self.residual, "euclidean", what="Euclidean")  # a residual method, not a rotation method
        if self.residual_kwargs is not None and not isinstance(self.residual_kwargs, Mapping):
            raise ConfigError(f"residual_kwargs must be a mapping, got {type(self.residual_kwargs).__name__}")
        kwargs = check_params(self.residual, self.residual_kwargs, extra=(SEED,))  # from the declarations
        object.__setattr__(self, "residual_kwargs", kwargs)
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; valid: 'float64', 'float32'")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return PRECISIONS[self.precision]

    @property
    def method_kwargs(self) -> dict[str, Any]:
        """The residual method's own parameters (``seed`` removed: it seeds `generator`)."""
        return {k: v for k, v in self.residual_kwargs.items() if k != "seed"}

    @property
    def method_name(self) -> str:
        """The name a report gives the merge: ``ties``, or ``orthomerge-conflict+ties``."""
        return self.residual if self.target is None else f"orthomerge-{self.target}+{self.residual}"

    def generator(self, name: str, device: torch.device | str) -> torch.Generator:
        """A generator for tensor ``name``: results do not depend on the order tensors are merged in."""
        seed = int(self.residual_kwargs.get("seed", 0))
        return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)

    def params(self) -> dict[str, Any]:
        """The options as a report records them."""
        return {
            "target": self.target,
            "residual": self.residual,
            "residual_kwargs": dict(self.residual_kwargs),
            "solver": self.solver,
        }
