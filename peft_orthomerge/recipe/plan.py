"""Planning a recipe: every check that can run before work starts, and the API call it will make."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..sources.resolve import looks_like_hub_ref, resolve_source


@dataclass
class MergePlan:
    """What `run_recipe` will do: the Python API function, its arguments, and the output."""

    recipe: Any
    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    output_dir: Path
    inputs: list[str]
    base_model: str | None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        def fmt(v: Any) -> str:
            return repr(str(v)) if isinstance(v, Path) else repr(v)

        parts = [fmt(a) for a in self.args] + [f"{k}={fmt(v)}" for k, v in self.kwargs.items()]
        lines = [f"{self.function}({', '.join(parts)})"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _resolve_ref(ref: str, base_dir: Path, *, what: str) -> str:
    """A local path (absolute, or relative to the recipe) as an absolute path, or a reachable Hub id
    (``org/name`` or ``org/name@revision``)."""
    local = Path(ref).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.exists():
        if not local.is_dir():
            raise InputError(f"{what} must be a directory", path=local)
        return str(local.resolve())
    if Path(ref).is_absolute() or not looks_like_hub_ref(ref):
        raise InputError(f"{what} not found (no such directory, and not a Hub repo id)", path=local)
    resolve_source(ref, kind="config")  # reachability: config files only
    return ref


def _output_path(recipe, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).expanduser().resolve()
    if recipe.origin == "mergekit":
        raise ConfigError(
            "a mergekit config names no output directory",
            hint="Pass --out DIR (out= in Python), as mergekit-yaml's OUT.",
        )
    raw = Path(recipe.output.path).expanduser()
    if raw.is_absolute() or ".." in Path(recipe.output.path).parts:
        resolved = (recipe.base_dir / raw).resolve()
        if raw.is_absolute() or recipe.base_dir not in (resolved, *resolved.parents):
            raise ConfigError(
                "output.path escapes the recipe's directory",
                path=recipe.output.path,
                hint="Use a path inside the recipe's directory, or pass --out (out=) explicitly.",
            )
    resolved = (recipe.base_dir / raw).resolve()
    if resolved == recipe.base_dir:
        raise ConfigError("output.path is the recipe's own directory", path=recipe.output.path)
    return resolved


def plan_recipe(
    recipe, *, out: str | os.PathLike | None = None, overwrite: bool = False, device: str = "cpu"
) -> MergePlan:
    """Validate everything that can be checked before work starts and build the API call.

    Checks that every local input exists and every Hub id is reachable (config files only), that
    the output directory can be used, and that the device exists. Writes nothing.
    """
    from ..device import resolve_device
    from ..sinks.output import check_output_dir

    base_dir = recipe.base_dir
    inputs = [_resolve_ref(s.path, base_dir, what="input") for s in recipe.inputs]
    base = None
    if recipe.base_model:
        base = _resolve_ref(recipe.base_model, base_dir, what="base_model")
    output_dir = _output_path(recipe, out)
    check_output_dir(output_dir, inputs=[*inputs, *([base] if base else [])], overwrite=overwrite)
    device = str(resolve_device(device))
    weights = [s.weight for s in recipe.inputs]
    if sum(weights) <= 0:  # each weight is already finite and >= 0
        raise ConfigError("input weights sum to zero", hint="Give at least one input a positive weight.")
    plan = _plan_oft if recipe.kind == "oft" else _plan_decoupled
    return plan(recipe, inputs, base, output_dir, weights=weights, overwrite=overwrite, device=device)


def _plan_oft(recipe, inputs, base, output_dir, *, weights, overwrite, device) -> MergePlan:
    m = recipe.method
    kwargs: dict[str, Any] = {
        "weights": weights,
        "method": m.name,
        "granularity": m.granularity,
        "cayley": m.cayley,
        "scale": m.scale,
    }
    if recipe.output.format == "folded":
        kwargs["fold_into"] = base
    elif base is not None:
        kwargs["base_model"] = base  # the merged adapter's base_model_name_or_path
    kwargs.update(overwrite=overwrite, device=device)
    return MergePlan(recipe, "merge_oft_checkpoints", [inputs, output_dir], kwargs, output_dir, inputs, base, device)


def _plan_decoupled(recipe, inputs, base, output_dir, *, weights, overwrite, device) -> MergePlan:
    m = recipe.method
    common = {
        "weights": weights,
        "target": m.target,
        "residual": m.residual,
        "residual_kwargs": m.residual_kwargs,
        "solver": m.solver,
    }
    if m.precision != "float64":  # the API's default; plans of recipes without the key stay as they were
        common["precision"] = m.precision
    if recipe.kind in ("full", "mixed"):
        kwargs = dict(common, include=m.include, exclude=m.exclude, device=device, overwrite=overwrite)
        if recipe.output.format == "lora":  # plans of full-model recipes stay as they were
            kwargs.update(export="lora", rank=m.rank)
        return MergePlan(recipe, "merge_models", [base, inputs, output_dir], kwargs, output_dir, inputs, base, device)
    kwargs = dict(common, export=recipe.output.format)
    if recipe.output.format == "lora":
        kwargs["rank"] = m.rank
    notes = [
        f"model = AutoModelForCausalLM.from_pretrained({base!r}, dtype='auto', trust_remote_code=False) on {device}",
        f"result.save_pretrained({str(output_dir)!r}) with model card, report and recipe",
    ]
    return MergePlan(recipe, "merge_lora_adapters", ["model", inputs], kwargs, output_dir, inputs, base, device, notes)
