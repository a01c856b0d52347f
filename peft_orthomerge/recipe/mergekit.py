"""mergekit configurations: translation of a mergekit 0.1.5 YAML config into this library's recipe.

A mapping with a ``merge_method`` key and no ``kind`` key is a mergekit config. `mergekit_to_recipe`
turns it into the mapping of a ``kind: full`` recipe (`schema.FullRecipe`), which is then validated,
dry-run, run and reported like any recipe. Supported::

    merge_method: ties            # task_arithmetic | ties | dare_ties | dare_linear | karcher
    base_model: org/base          # required, except for karcher
    models:
      - model: org/math           # a local directory or Hub id (org/name@revision)
        parameters: {weight: 1.0, density: 0.5}
      - model: org/base           # an entry equal to base_model is the base, as in mergekit
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}
    dtype: float32                # compute precision: float64, or float32 (also for bfloat16 / float16)
    tokenizer_source: base        # the output gets the base's tokenizer files (the only choice)

Per-model ``parameters`` override the global ones, as in mergekit. The methods, with mergekit's
definitions (`ops.mergekit_compat`), raw weights ``W_i`` and ``S = sum_i W_i``:

- ``task_arithmetic``: ``base + lambda * sum_i W_i tau_i`` (``normalize`` default false; true
  divides by ``S``), run as this library's ``ta`` with ``lam = lambda * S / N`` (or ``lambda / N``):
  the same tensors, and the row-streamed path.
- ``ties``: ``mergekit_ties`` (magnitude trim to ``density``, default 1.0; sign of the weighted sum;
  agreeing entries summed and, with ``normalize`` (default true), divided by the summed weights of
  the agreeing entries, not their count).
- ``dare_ties`` / ``dare_linear``: ``mergekit_dare_ties`` / ``mergekit_dare_linear`` (random keep
  with probability ``density``, default 1.0; ``rescale`` (default true) matches each task vector's
  L1 norm, where DARE rescales by ``1/density``; ``normalize`` default false). The random masks
  come from this library's seeded generator, not mergekit's global one: with ``density < 1`` the
  definition is the same but the kept entries differ.
- ``karcher``: ``mergekit_karcher`` on the full weights, uniform weights (``weight`` is refused, as
  mergekit's karcher takes none), ``max_iter`` (10) and ``tol`` (1e-5), stopped without error after
  ``max_iter`` steps. mergekit includes ``base_model`` among the merged models when it is given;
  so does the translation. Without ``base_model`` the first model serves as the base (the result
  does not depend on it).
- ``orthomerge``: the decoupled merge (`merge_models`), global parameters ``target`` (``global`` |
  ``conflict``, default ``global``), ``residual`` (any Euclidean method of this library,
  ``peft-orthomerge methods``; default ``ta``), ``solver``, and the residual's own parameters
  (``density``, ``lam``, ``p``, ...); per-model ``weight`` (default 1, normalised).
- ``orthomerge_<m>``: the decoupled merge whose residual is merged as mergekit's ``<m>`` above
  (``<m>`` one of task_arithmetic, ties, dare_ties, dare_linear, karcher, with that method's
  parameters), so changing ``merge_method: ties`` to ``merge_method: orthomerge_ties`` keeps every
  other key; or, for any other ``<m>`` of this library's Euclidean methods (``orthomerge_tsvm``,
  ``orthomerge_fisher_rao``, ``orthomerge_dare_ta``), the method of that name with its parameters.
  ``target`` is a global parameter of every ``orthomerge_*`` method.

``int8_mask`` only chooses mergekit's mask dtype and changes no value: it is accepted and unused.
The output is written in the base model's dtype (``out_dtype`` is refused). Refused, with one line
naming the key: ``slices``, ``modules`` (layer stacking, passthrough), ``tokenizer``,
``chat_template``, ``tokenizer_source`` other than ``base``, ``model+lora`` references, per-layer
gradients and filtered parameters, per-model densities that differ, negative weights, and every
other ``merge_method`` (``slerp``, ``nuslerp``, ``model_stock``, ``passthrough``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

MERGEKIT_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "tokenizer_source",
    "slices",
    "modules",
    "tokenizer",
    "chat_template",
    "out_dtype",
)
REFUSED_KEYS = {
    "slices": "layer slices (passthrough, layer stacking) are not supported; list whole models under 'models'",
    "modules": "per-module merges are not supported; list whole models under 'models'",
    "tokenizer": "tokenizer surgery is not supported; the output gets the base model's tokenizer",
    "chat_template": "chat templates are not supported; the output gets the base model's tokenizer files",
    "out_dtype": "out_dtype is not supported; the output is written in the base model's dtype",
}
PRECISION = {"float64": "float64", "float32": "float32", "bfloat16": "float32", "float16": "float32"}
ORTHOMERGE = "orthomerge"
ORTHOMERGE_PARAMS = ("target", "residual", "solver")


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit merge method maps onto a residual method of this library.

    ``residual``: the registered method; ``model_params``: per-model parameter names (global
    defaults allowed); ``shared``: global-only parameters and their mergekit defaults;
    ``weighted``: whether the method takes the per-model ``weight`` (required, as in mergekit)."""

    residual: str
    model_params: tuple[str, ...]
    shared: Mapping[str, Any]
    weighted: bool = True


GTA_SHARED = {"lambda": 1.0, "int8_mask": False}
METHODS: dict[str, MergekitMethod] = {
    "task_arithmetic": MergekitMethod("ta", ("weight",), {**GTA_SHARED, "normalize": False}),
    "ties": MergekitMethod("mergekit_ties", ("weight", "density"), {**GTA_SHARED, "normalize": True}),
    "dare_ties": MergekitMethod(
        "mergekit_dare_ties", ("weight", "density"), {**GTA_SHARED, "normalize": False, "rescale": True}
    ),
    "dare_linear": MergekitMethod(
        "mergekit_dare_linear", ("weight", "density"), {**GTA_SHARED, "normalize": False, "rescale": True}
    ),
    "karcher": MergekitMethod("mergekit_karcher", (), {"max_iter": 10, "tol": 1e-5}, weighted=False),
}


def is_mergekit_config(data: Any) -> bool:
    """Whether ``data`` (a parsed YAML document) is a mergekit config: ``merge_method`` and no ``kind``."""
    return isinstance(data, Mapping) and "merge_method" in data and "kind" not in data


def _fail(message: str, source: str | None) -> ConfigError:
    return ConfigError(f"mergekit config: {message}", path=source)


def _scalar(value: Any, key: str, source: str | None) -> Any:
    if isinstance(value, (list, dict)):
        raise _fail(f"{key}: per-layer gradients and filtered parameters are not supported; give one value", source)
    if not isinstance(value, (bool, int, float, str)) and value is not None:
        raise _fail(f"{key} must be a number, boolean or string, got {type(value).__name__}", source)
    return value


def _model_ref(value: Any, key: str, source: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"{key} must be a local directory or Hub id (a string)", source)
    if "+" in value:
        raise _fail(
            f"{key} {value!r}: 'model+lora' references are not supported; merge LoRA adapters with a "
            "recipe of kind lora or mixed",
            source,
        )
    return value


def _models(data: Mapping[str, Any], source: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``(model reference, its own parameters)`` per entry of ``models``."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise _fail("'models' must be a non-empty list of {model: ..., parameters: ...}", source)
    out = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(f"{where} must be a mapping with key 'model'", source)
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise _fail(f"unknown key {where}.{unknown[0]}; valid: model, parameters", source)
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise _fail(f"{where}.parameters must be a mapping", source)
        ref = _model_ref(entry["model"], f"{where}.model", source)
        out.append((ref, {k: _scalar(v, f"{where}.parameters.{k}", source) for k, v in params.items()}))
    return out


def _check_top_level(data: Mapping[str, Any], source: str | None) -> None:
    for key in data:
        if key in REFUSED_KEYS and data[key] is not None:
            raise _fail(f"key '{key}': {REFUSED_KEYS[key]}", source)
        if key not in MERGEKIT_KEYS:
            raise _fail(f"unknown key '{key}'; valid: {', '.join(MERGEKIT_KEYS)}", source)
    tokenizer = data.get("tokenizer_source")
    if tokenizer not in (None, "base"):
        raise _fail(
            f"key 'tokenizer_source': {tokenizer!r} is not supported (tokenizer surgery); remove it or use 'base'",
            source,
        )


def _precision(data: Mapping[str, Any], source: str | None) -> str | None:
    dtype = data.get("dtype")
    if dtype is None:
        return None
    if dtype not in PRECISION:
        raise _fail(f"key 'dtype': {dtype!r} is not supported; valid: {', '.join(PRECISION)}", source)
    return PRECISION[dtype]


def _method_name(name: Any, source: str | None) -> tuple[str, str | None]:
    """``(kind of translation, mergekit method of the residual)``: ``("mergekit", m)``,
    ``("orthomerge", m)`` for ``orthomerge_<m>`` with a mergekit ``m``, ``("orthomerge", None)``."""
    if not isinstance(name, str):
        raise _fail("'merge_method' must be a string", source)
    if name in METHODS:
        return "mergekit", name
    if name == ORTHOMERGE:
        return ORTHOMERGE, None
    suffix = name.removeprefix(f"{ORTHOMERGE}_")
    if suffix != name and suffix in METHODS:
        return ORTHOMERGE, suffix
    if suffix != name:
        return ORTHOMERGE, None
    valid = ", ".join([*METHODS, ORTHOMERGE, *(f"{ORTHOMERGE}_{m}" for m in METHODS)])
    raise _fail(f"key 'merge_method': {name!r} is not supported; valid: {valid}, orthomerge_<residual>", source)


def _density(per_model: list[dict[str, Any]], source: str | None) -> Any:
    densities = {m["density"] for m in per_model}
    if len(densities) > 1:
        raise _fail(
            f"parameters.density differs between models ({sorted(densities)}); only one density per merge is "
            "supported: give one value under the global 'parameters'",
            source,
        )
    return densities.pop()


def _mergekit_residual(
    method: str, params: Mapping[str, Any], models: list[tuple[str, dict[str, Any]]], source: str | None
) -> tuple[str, dict[str, Any], list[float]]:
    """``(residual, residual_kwargs, raw weights)`` of mergekit's ``method`` with global ``params``."""
    spec = METHODS[method]
    shared = dict(spec.shared)
    per_model_defaults: dict[str, Any] = {"density": 1.0} if "density" in spec.model_params else {}
    for key, value in params.items():
        if key in shared:
            shared[key] = value
        elif key in spec.model_params:
            per_model_defaults[key] = value
        else:
            valid = ", ".join([*spec.shared, *spec.model_params])
            raise _fail(f"unknown parameter 'parameters.{key}' for merge_method {method}; valid: {valid}", source)
    per_model = []
    for i, (_, own) in enumerate(models):
        for key in own:
            if key not in spec.model_params:
                valid = ", ".join(spec.model_params) or "none"
                raise _fail(f"unknown parameter 'models[{i}].parameters.{key}' for {method}; valid: {valid}", source)
        merged = {**per_model_defaults, **own}
        if spec.weighted and "weight" not in merged:
            raise _fail(f"models[{i}].parameters.weight is required by merge_method {method} (as in mergekit)", source)
        per_model.append(merged)
    if not spec.weighted:
        return spec.residual, {k: shared[k] for k in params if k in shared}, [1.0] * len(models)
    weights = [m["weight"] for m in per_model]
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise _fail(f"models[{i}].parameters.weight must be a number >= 0, got {w!r}", source)
    total = float(sum(weights))
    lam = float(shared["lambda"]) * (1.0 if shared["normalize"] else total)
    if spec.residual == "ta":
        return spec.residual, {"lam": lam / len(models)}, weights
    kwargs: dict[str, Any] = {"density": _density(per_model, source), "lam": lam}
    if "rescale" in shared:
        kwargs["rescale"] = shared["rescale"]
    if spec.residual != "mergekit_dare_linear":
        kwargs["normalize"] = shared["normalize"]
    return spec.residual, kwargs, weights


def _split_orthomerge(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    own = {k: params[k] for k in ORTHOMERGE_PARAMS if k in params}
    rest = {k: v for k, v in params.items() if k not in ORTHOMERGE_PARAMS}
    return own, rest


def mergekit_to_recipe(data: Mapping[str, Any], *, source: str | None = None) -> dict[str, Any]:
    """The ``kind: full`` recipe mapping equivalent to the mergekit config ``data`` (module docstring).

    Raises `ConfigError` (one line, naming the key) for anything this library does not support."""
    _check_top_level(data, source)
    how, mk_method = _method_name(data["merge_method"], source)
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise _fail("'parameters' must be a mapping", source)
    params = {k: _scalar(v, f"parameters.{k}", source) for k, v in params.items()}
    base = data.get("base_model")
    models = _models(data, source)
    if base is not None:
        base = _model_ref(base, "base_model", source)
        if not (mk_method == "karcher" and how == "mergekit"):
            models = [(ref, own) for ref, own in models if ref != base]  # mergekit: that entry is the base
        elif all(ref != base for ref, _ in models):
            models = [(base, {}), *models]  # mergekit's karcher merges the base with the models
    elif mk_method == "karcher" and how == "mergekit":
        base = models[0][0]
    else:
        raise _fail("'base_model' is required (the model the inputs were fine-tuned from)", source)
    if not models:
        raise _fail("'models' lists only the base model; add the fine-tuned models to merge", source)

    method: dict[str, Any]
    if how == ORTHOMERGE:
        own, rest = _split_orthomerge(params)
        method = {"name": ORTHOMERGE, "target": own.get("target", "global")}
        if "solver" in own:
            method["solver"] = own["solver"]
        if mk_method is not None:
            if "residual" in own:
                raise _fail(f"parameters.residual: merge_method {data['merge_method']} already names it", source)
            residual, kwargs, weights = _mergekit_residual(mk_method, rest, models, source)
        else:
            residual = own.get("residual", data["merge_method"].removeprefix(f"{ORTHOMERGE}_"))
            if residual == ORTHOMERGE:
                residual = "ta"
            kwargs, weights = rest, _plain_weights(models, source)
        method.update(residual=residual, residual_kwargs=kwargs or None)
    else:
        residual, kwargs, weights = _mergekit_residual(mk_method, params, models, source)
        method = {"name": "euclidean", "residual": residual, "residual_kwargs": kwargs or None}
    precision = _precision(data, source)
    if precision is not None:
        method["precision"] = precision
    return {
        "kind": "full",
        "base_model": base,
        "inputs": [{"path": ref, "weight": w} for (ref, _), w in zip(models, weights)],
        "method": method,
        "output": {"path": "merged"},
    }


def _plain_weights(models: list[tuple[str, dict[str, Any]]], source: str | None) -> list[float]:
    """Per-model ``weight`` (default 1) of ``orthomerge`` with a residual of this library."""
    weights = []
    for i, (_, own) in enumerate(models):
        unknown = sorted(set(own) - {"weight"})
        if unknown:
            raise _fail(
                f"unknown parameter 'models[{i}].parameters.{unknown[0]}'; per-model parameters of orthomerge: "
                "weight (the residual's parameters go under the global 'parameters')",
                source,
            )
        weights.append(own.get("weight", 1.0))
    return weights
