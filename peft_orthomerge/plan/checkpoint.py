"""The plan of a full-checkpoint merge: per tensor, whether it is decoupled, how it is read, its cost.

Built from the base checkpoint's header alone (no tensor data is read), the same on every rank
of a multi-process merge, so each rank can take its share of the `TensorTask` list.

Each task records its decoupling driver (`ops.decouple.decoupling_path`, where that choice is
made) and its route (how a tensor reaches the math):

- ``"rows"``: straight from the files by blocks of rows, never a whole tensor in memory
  (`merge.tensor.merge_rows`): task arithmetic and the residual methods with a row-block form
  (`ops.streamed_rows`) on every tensor that is not decoupled (that the method `fits`), and decoupled weights in torch
  layout on the row-block path (TA) or, for those methods, with ``out >= in``;
- ``"tensor"``: the base tensor in memory and the experts read one at a time
  (`merge.tensor.merge_tensor`): everything else that is floating point;
- ``"copy"``: non-floating tensors, copied from the base.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..ops.decouple import decoupling_path
from ..ops.streamed_rows import fits, row_method
from ..sources.layout import conv1d_weight_names
from ..sources.tensors import TensorReader
from .options import DecoupleOptions


def compile_patterns(patterns: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    """``include`` / ``exclude`` regexes, compiled; `ConfigError` naming the bad one."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise ConfigError(f"invalid {what} regex {p!r}: {exc}") from None
    return out


def estimate_cost(shape: Sequence[int], *, decoupled: bool = True) -> float:
    """Estimated cost of merging one tensor of ``shape`` (torch layout, W is (out, in)).

    A decoupled 2-D weight costs a cross Gram ``W0^T W_i`` (``out * in^2``) plus an ``in x in``
    polar factor (``in^3``); anything else (1-D tensors, plain Euclidean merges) is linear
    in its size.
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    if decoupled and len(shape) == 2:
        out, inp = int(shape[0]), int(shape[1])
        return float(inp) ** 3 + float(out) * float(inp) ** 2
    return float(numel)


@dataclass(frozen=True)
class TensorTask:
    """One checkpoint tensor: its name, shape for the math (``(out, in)``: a ``Conv1D`` weight,
    stored ``(in, out)``, has ``transposed`` set), whether it is decoupled, the decoupling driver
    (`ops.decouple.decoupling_path`; ``"euclidean"`` for a tensor merged without rotation,
    ``"copy"`` for a non-floating one), how it is read (``route``) and its estimated cost."""

    name: str
    shape: tuple[int, ...]
    decoupled: bool
    transposed: bool
    path: str
    route: str
    cost: float


def _path(floating: bool, decoupled: bool, shape: tuple[int, ...], options: DecoupleOptions, given: bool) -> str:
    if not floating:
        return "copy"
    if not decoupled:
        return "euclidean"
    return decoupling_path(shape, options.target, options.residual, options.method_kwargs, given=given)


def _route(path: str, transposed: bool, options: DecoupleOptions, shape: tuple[int, ...], given: bool) -> str:
    """``rows`` where the merge can read the files by blocks of rows: every TA tensor merged without
    rotation, the row-block decoupling path on a weight stored in torch layout, and for a residual
    method with a row-block form (`ops.streamed_rows`) every tensor merged without rotation and
    every decoupled weight in torch layout with ``out >= in`` (its ``in x in`` matrices per task are
    at most the size of the weight) unless an expert brings its own rotation (``given``: the
    row-block residual driver solves Procrustes rotations only, so those weights stay whole)."""
    if path == "copy":
        return "copy"
    if path == "rows" and not transposed:
        return "rows"
    rows_form = row_method(options.residual) is not None and fits(options.residual, shape)
    if path == "euclidean" and shape and (options.residual == "ta" or rows_form):
        return "rows"
    if path == "dense" and not given and not transposed and rows_form and shape[0] >= shape[1]:
        return "rows"
    return "tensor"


def plan_checkpoint(
    base: TensorReader,
    base_dir: Path,
    options: DecoupleOptions,
    *,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
    rotated: Collection[str] = (),
) -> list[TensorTask]:
    """One `TensorTask` per tensor of ``base``, in the checkpoint's order.

    A tensor is decoupled when the options have a target, it is 2-D, its name matches an
    ``include`` pattern (none given: every name; ``re.search``) and no ``exclude`` pattern
    (`compile_patterns` makes both). Weights of transformers'
    ``Conv1D`` modules are found from ``base_dir/config.json`` (`sources.layout.conv1d_weight_names`).
    ``rotated``: the weights for which some expert brings its own rotation (OFT adapters,
    `sources.checkpoint.rotated_tensors`); decoupled, they take the dense driver.
    """
    names = base.keys()
    conv1d = conv1d_weight_names(base_dir, names)
    tasks = []
    for name in names:
        stored = base.shape(name)
        transposed = name in conv1d and len(stored) == 2
        shape = stored[::-1] if transposed else stored
        decoupled = (
            options.target is not None
            and len(stored) == 2
            and (not include or any(p.search(name) for p in include))
            and not any(p.search(name) for p in exclude)
        )
        given = name in rotated
        path = _path(base.dtype(name).is_floating_point, decoupled, shape, options, given)
        route = _route(path, transposed, options, shape, given)
        cost = estimate_cost(shape, decoupled=decoupled)
        tasks.append(TensorTask(name, shape, decoupled, transposed, path, route, cost))
    return tasks
