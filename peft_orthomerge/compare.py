"""Compare merge methods on your own models with your own evaluation.

`compare_methods` merges the same adapters with several methods, calls your evaluation function on
every merged model, and returns one row per method (and prints a markdown table), so that you can
choose a method on your data rather than on the paper's benchmarks::

    from peft_orthomerge.compare import compare_methods

    def evaluate(model) -> dict[str, float]:          # your metric(s), higher is better
        return {"math": acc_math(model), "code": acc_code(model)}

    rows = compare_methods(base, ["oft-math", "oft-code"], evaluate, kind="oft")

Method names (read from the method registry, `peft_orthomerge.ops.registry.method_names`)
    ``kind="oft"`` (OFT adapters; see `merge_oft_adapters` / `merge_oft_checkpoints`):

    - the rotation methods whose result is a rotation (``orthomerge``, ``mean_q``, ...) are merged
      in so(b) and loaded as an OFT adapter on a copy of the base; ``"<method>/<granularity>"``
      (``"orthomerge/block"``) picks a granularity other than the default;
    - the other rotation methods (``mean_r``) and every Euclidean method (``ta``, ``ties``, ...) are
      folded into the base weights first (``W_i = W0 @ blockdiag(R_i)^T``) and merged as weights,
      written with ``merge_oft_checkpoints(..., fold_into=base)`` to a temporary directory and
      loaded with the base model's class.

    ``kind="lora"`` (LoRA adapters; see `merge_lora_adapters`): ``"<residual>"`` is the plain
    Euclidean merge of the folded LoRA deltas (``target=None``); ``"<residual>+G"`` and
    ``"<residual>+C"`` decouple each expert into a rotation (global or conflict-aware target) and
    a residual merged with ``<residual>`` (OrthoMerge-G / OrthoMerge-C in the paper).

Every merge works on a deep copy of ``base_model``; your model is never modified. A method that
fails with an `OrthoMergeError` (e.g. not available in this version, or numerically undefined on
your inputs) gives a row with ``error`` set instead of stopping the comparison; other exceptions
propagate.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, OrthoMergeError
from .ops.registry import get_method, method_names

if TYPE_CHECKING:
    import torch

Evaluate = Callable[[Any], Mapping[str, float]]

LORA_TARGETS = {"": None, "+G": "global", "+C": "conflict"}


def _adapter_space() -> list[str]:
    """Rotation methods that give a rotation, each followed by its non-default granularities."""
    names = []
    for name in method_names("rotation"):
        spec = get_method(name)
        if not spec.orthogonal:
            continue
        names.append(name)
        for param in spec.params:
            if param.name == "granularity":
                names += [f"{name}/{g}" for g in typing.get_args(param.annotation) if g != param.default]
    return names


def available_methods(kind: str = "oft") -> list[str]:
    """The method names `compare_methods` runs by default for ``kind`` in this installation."""
    euclid = method_names("euclidean")
    if kind == "oft":
        folded = [m for m in method_names("rotation") if not get_method(m).orthogonal]
        return _adapter_space() + folded + euclid
    if kind == "lora":
        return [f"{r}{suffix}" for r in euclid for suffix in LORA_TARGETS]
    raise ConfigError(f"unknown kind {kind!r}; valid: 'oft', 'lora'")


def _average(scores: Mapping[str, float], keys: Sequence[str] | None) -> float:
    values = [float(scores[k]) for k in (keys if keys is not None else scores)]
    return sum(values) / len(values) if values else math.nan


def _base_dir(base_model: Any, workdir: Path) -> Path:
    path = workdir / "base"
    if not path.exists():
        base_model.save_pretrained(path, safe_serialization=True)
    return path


def _merge_oft(base_model: Any, adapters: Sequence[str], method: str, weights, workdir: Path, kwargs: dict):
    from .api.oft import merge_oft_adapters, merge_oft_checkpoints

    if method in _adapter_space():
        name, _, granularity = method.partition("/")
        return merge_oft_adapters(
            copy.deepcopy(base_model),
            list(adapters),
            weights,
            method=name,
            granularity=granularity or "module",
            **kwargs,
        )
    out = workdir / f"merged-{method}"
    merge_oft_checkpoints(
        list(adapters), out, weights, method=method, fold_into=str(_base_dir(base_model, workdir)), **kwargs
    )
    model = type(base_model).from_pretrained(out)
    return model.to(dtype=base_model.dtype)


def _merge_lora(base_model: Any, adapters: Sequence[str], method: str, weights, kwargs: dict):
    from .api.decouple import merge_lora_adapters

    suffix = next((s for s in LORA_TARGETS if s and method.endswith(s)), "")
    residual, target = (method[: -len(suffix)], LORA_TARGETS[suffix]) if suffix else (method, None)
    return merge_lora_adapters(
        copy.deepcopy(base_model), list(adapters), weights, target=target, residual=residual, export="model", **kwargs
    )


def _load_single(base_model: Any, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), adapter)


def compare_methods(
    base_model: Any,
    adapters: Sequence[str],
    evaluate: Evaluate,
    *,
    kind: str = "oft",
    methods: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    average_over: Sequence[str] | None = None,
    include_base: bool = True,
    include_individual: bool = False,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Merge ``adapters`` with each method, evaluate every merged model, return one row per method.

    Args:
        base_model: the base transformers model (e.g. ``AutoModelForCausalLM.from_pretrained(...)``);
            never modified (each merge starts from a deep copy).
        adapters: adapter directories or Hub ids (OFT adapters for ``kind="oft"``, LoRA for ``"lora"``).
        evaluate: your evaluation, ``model -> {metric name: score}``; called once per row, on the
            model in eval mode. Any metrics may be returned; they appear as columns.
        kind: ``"oft"`` or ``"lora"``.
        methods: method names (see the module docstring); default `available_methods(kind)`.
        weights: task weights for every merge (normalised to sum to 1; default uniform).
        average_over: the metric names averaged into the ``average`` column (default: all).
        include_base: add a row ``"base"`` for the unmodified base model.
        include_individual: add a row ``"single:<adapter>"`` per adapter applied alone.
        method_kwargs: extra keyword arguments per method name, passed to the merge function
            (e.g. ``{"ta": {"residual_kwargs": {"lam": 1.0}}}`` for LoRA).
        verbose: print a markdown table of the rows at the end.

    Returns:
        One dict per row: ``method``, ``seconds`` (merge time, excluding evaluation), every metric
        returned by ``evaluate``, ``average``, and ``error`` (``None``, or the message of the
        `OrthoMergeError` that made this method fail; its metrics are then absent).
    """
    if kind not in ("oft", "lora"):
        raise ConfigError(f"unknown kind {kind!r}; valid: 'oft', 'lora'")
    if not adapters:
        raise ConfigError("no adapters to compare", hint="Pass at least one adapter directory or Hub id.")
    methods = list(methods) if methods is not None else available_methods(kind)
    method_kwargs = dict(method_kwargs or {})
    was_training = getattr(base_model, "training", False)
    base_model.eval()
    rows: list[dict[str, Any]] = []
    try:  # the base model's train / eval mode is restored even when a merge or evaluation raises
        with tempfile.TemporaryDirectory(prefix="orthomerge-compare-") as tmp:
            workdir = Path(tmp)
            for name, build in _builds(
                base_model,
                adapters,
                kind,
                methods,
                weights,
                method_kwargs,
                workdir,
                include_base=include_base,
                include_individual=include_individual,
            ):
                rows.append(_row(name, build, evaluate, average_over))
    finally:
        base_model.train(was_training)
    if verbose:
        print(format_table(rows))
    return rows


def _builds(base_model, adapters, kind, methods, weights, method_kwargs, workdir, *, include_base, include_individual):
    """``(row name, zero-argument function building the model)`` for every row, in table order."""
    if include_base:
        yield "base", lambda: base_model
    if include_individual:
        for adapter in adapters:
            yield f"single:{adapter}", lambda a=adapter: _load_single(base_model, str(a))
    for method in methods:
        kwargs = dict(method_kwargs.get(method, {}))
        if kind == "oft":
            yield method, lambda m=method, k=kwargs: _merge_oft(base_model, adapters, m, weights, workdir, k)
        else:
            yield method, lambda m=method, k=kwargs: _merge_lora(base_model, adapters, m, weights, k)


def _row(name: str, build: Callable[[], Any], evaluate: Evaluate, average_over: Sequence[str] | None) -> dict:
    """Build one model and evaluate it; a build failing with an `OrthoMergeError` gives an error row."""
    t0 = time.perf_counter()
    try:
        model = build()
    except OrthoMergeError as exc:
        return {"method": name, "seconds": time.perf_counter() - t0, "error": str(exc)}
    seconds = time.perf_counter() - t0
    model.eval()
    scores = {k: float(v) for k, v in evaluate(model).items()}
    return {"method": name, "seconds": seconds, **scores, "average": _average(scores, average_over), "error": None}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A markdown table of `compare_methods` rows (failed methods show their error)."""
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in ("method", "error", "seconds") and key not in columns:
                    columns.append(key)
    header = ["method", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.get("error"):
            cells = [str(row["method"]), f"failed: {row['error']}"] + [""] * (len(columns) - 1)
        else:
            cells = [str(row["method"])] + [_fmt(row.get(c), digits) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def hyperspherical_energy(weight: torch.Tensor, eps: float = 1e-12) -> float:
    """Hyperspherical energy of the neurons of a weight ``W`` in torch layout ``(out, in)``.

    The neurons are the ``out`` rows ``w_i`` (each in R^in), normalised to unit length
    ``w_i_hat = w_i / ||w_i||``; the energy is ``E = sum_{i<j} 1 / ||w_i_hat - w_j_hat||``, computed
    in float64. OFT's rotation acts on the input side, ``W -> W @ blockdiag(R)^T``, i.e.
    ``w_i -> blockdiag(R) w_i`` for every row, which preserves every pairwise distance of the unit
    rows: the energy of an orthogonally fine-tuned or orthogonally merged weight equals the base's.
    Zero rows are left out; coincident unit rows (distance below ``eps``) give ``inf``.
    """
    import torch

    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    norms = w.norm(dim=1)
    w = w[norms > 0] / norms[norms > 0, None]
    dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
    iu = torch.triu_indices(w.shape[0], w.shape[0], 1)
    d = dist[iu[0], iu[1]]
    if bool((d < eps).any()):
        return math.inf
    return float((1.0 / d).sum())


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of ``W`` (2-D view ``(out, -1)``), in float64."""
    import torch

    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    return float(torch.linalg.matrix_norm(w, ord=2))
