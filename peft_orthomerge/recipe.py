"""YAML merge recipes: validation (pydantic) and execution through the public Python API.

A recipe describes one merge::

    kind: oft                  # oft | lora | full
    base_model: path-or-hub-id # required for lora, full, and folded oft output
    inputs:
      - path: ./oft-math
        weight: 2.0            # optional, default 1 (weights are normalised to sum to 1)
      - path: org/oft-code
    method:
      name: orthomerge         # oft: orthomerge | mean_q | mean_r | product_r | karcher | ta | ties | ... (folded)
      granularity: module      # other keys map one to one onto the Python API's keywords
    output:
      path: ./merged
      format: adapter          # oft: adapter | folded; lora: model | lora; full: model

Method keys per kind (defaults in brackets):

- ``oft`` -> `merge_oft_checkpoints`: ``name`` [orthomerge] (passed as ``method``),
  ``granularity`` [module], ``cayley`` [auto], ``scale`` [1.0].
- ``lora`` -> `merge_lora_adapters`; ``full`` -> `merge_models`: ``name`` [orthomerge] or
  ``euclidean`` (no rotation: ``target=None``), ``target`` [global] (global | conflict),
  ``residual`` [ta], ``residual_kwargs`` [none], ``solver`` [auto], ``precision`` [float64]
  (float64 | float32: the compute dtype); ``lora`` also ``rank``
  (required for ``format: lora``); ``full`` also ``include`` / ``exclude`` (regexes).

Paths: relative paths resolve against the recipe file's directory. Inputs and ``base_model`` may
be local directories (absolute, or relative with ``..``) or Hub repo ids. The output path of a
recipe must stay inside the recipe's directory (no absolute path, no ``..`` escape), so that a
recipe received from someone else cannot write, or with ``--overwrite`` replace, a directory
elsewhere; the command line's ``--out`` (typed by the user) is not restricted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, InputError, OrthoMergeError
from .report import REPORT_FILE, MergeReport
from .sources.resolve import looks_like_repo_id, resolve_source

RECIPE_FILE = "orthomerge_recipe.yaml"

RESIDUALS = ("ta", "ties", "dare_ta", "dare_ties", "tsvm")
FORMATS = {"oft": ("adapter", "folded"), "lora": ("model", "lora"), "full": ("model",)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("paths cannot contain NUL bytes")
    return value


PathStr = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]


class InputSpec(_Strict):
    """One input: a local directory or Hub repo id, and its (unnormalised) task weight."""

    path: PathStr
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)


class OftMethod(_Strict):
    """Options of `merge_oft_checkpoints` (``name`` is its ``method`` keyword)."""

    name: str = "orthomerge"
    granularity: Literal["module", "block"] = "module"
    cayley: Literal["auto", "exact", "neumann"] = "auto"
    scale: float = Field(default=1.0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _known_method(cls, value: str) -> str:
        """so(b) methods (adapter or folded output) or Euclidean baselines on folded weights."""
        from .ops.registry import euclidean_methods
        from .ops.so_merge import so_methods

        valid = [*so_methods(), *euclidean_methods()]
        if value not in valid:
            raise ValueError(f"unknown OFT method {value!r}; valid: {', '.join(valid)}")
        return value


class _DecoupleMethod(_Strict):
    """Options shared by `merge_lora_adapters` and `merge_models`.

    ``name: euclidean`` is the plain Euclidean baseline (``target=None``): the residual method
    alone merges the task vectors.
    """

    name: Literal["orthomerge", "euclidean"] = "orthomerge"
    target: Literal["global", "conflict"] | None = "global"
    residual: str = "ta"
    residual_kwargs: dict[str, float | int | bool | str | None] | None = None
    solver: Literal["auto", "svd", "newton_schulz"] = "auto"

    @field_validator("residual")
    @classmethod
    def _known_residual(cls, value: str) -> str:
        from .ops.registry import euclidean_methods

        if value not in euclidean_methods():
            raise ValueError(f"unknown residual method {value!r}; valid: {', '.join(euclidean_methods())}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _euclidean_has_no_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") == "euclidean":
            if data.get("target") is not None:
                raise ValueError("name 'euclidean' merges without rotation; remove 'target' (or set it to null)")
            data = {**data, "target": None}
        return data

    @model_validator(mode="after")
    def _orthomerge_has_target(self) -> _DecoupleMethod:
        if self.name == "orthomerge" and self.target is None:
            raise ValueError("target null means no rotation; write 'name: euclidean' instead")
        return self


Precision = Literal["float64", "float32"]  # the API's ``precision``: compute dtype of the merge


class LoraMethod(_DecoupleMethod):
    rank: int | None = Field(default=None, ge=1)
    precision: Precision = "float64"


class FullMethod(_DecoupleMethod):
    include: str | None = None
    exclude: str | None = None
    precision: Precision = "float64"

    @field_validator("include", "exclude")
    @classmethod
    def _is_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from exc
        return value


class _Output(_Strict):
    path: PathStr


class OftOutput(_Output):
    format: Literal["adapter", "folded"] = "adapter"


class LoraOutput(_Output):
    format: Literal["model", "lora"] = "model"


class FullOutput(_Output):
    format: Literal["model"] = "model"


class _RecipeBase(_Strict):
    base_model: PathStr | None = None
    inputs: list[InputSpec] = Field(min_length=1)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths resolve against (the recipe file's directory)."""
        return self._base_dir

    def with_base_dir(self, directory: str | os.PathLike) -> _RecipeBase:
        self._base_dir = Path(directory).resolve()
        return self


class OftRecipe(_RecipeBase):
    kind: Literal["oft"]
    method: OftMethod = OftMethod()
    output: OftOutput

    @model_validator(mode="after")
    def _check(self) -> OftRecipe:
        if self.output.format == "folded" and not self.base_model:
            raise ValueError("output format 'folded' needs base_model (the model to fold the merged adapter into)")
        from .ops.registry import get_method

        if not get_method(self.method.name).orthogonal and self.output.format != "folded":
            raise ValueError(
                f"method {self.method.name!r} does not give a rotation and can only be exported folded (output.format: folded)"
            )
        return self


class LoraRecipe(_RecipeBase):
    kind: Literal["lora"]
    method: LoraMethod = LoraMethod()
    output: LoraOutput

    @model_validator(mode="after")
    def _check(self) -> LoraRecipe:
        if not self.base_model:
            raise ValueError("kind 'lora' needs base_model (the model the adapters were trained on)")
        if self.output.format == "lora" and self.method.rank is None:
            raise ValueError("output format 'lora' needs method.rank (rank of the merged LoRA adapter)")
        if self.output.format == "model" and self.method.rank is not None:
            raise ValueError("method.rank only applies to output format 'lora'")
        return self


class FullRecipe(_RecipeBase):
    kind: Literal["full"]
    method: FullMethod = FullMethod()
    output: FullOutput

    @model_validator(mode="after")
    def _check(self) -> FullRecipe:
        if not self.base_model:
            raise ValueError("kind 'full' needs base_model (the model the checkpoints were fine-tuned from)")
        return self


Recipe = Annotated[OftRecipe | LoraRecipe | FullRecipe, Field(discriminator="kind")]
_RECIPE = TypeAdapter(Recipe)
_MODELS = {"oft": OftRecipe, "lora": LoraRecipe, "full": FullRecipe}


# -- parsing --------------------------------------------------------------------------------------
def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model found by following ``loc`` (field names and list indices) from ``root``."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return None
        annotation = info.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(exc: ValidationError, data: Any) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    kind = data.get("kind") if isinstance(data, dict) else None
    if err["type"] == "union_tag_not_found":
        return "missing key 'kind' (one of: oft, lora, full)"
    if err["type"] == "union_tag_invalid":
        return f"unknown kind {err['ctx']['tag']!r}; valid kinds: oft, lora, full"
    if kind in _MODELS and loc and loc[0] == kind:
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden" and kind in _MODELS:
        parent = _model_at(_MODELS[kind], loc[:-1])
        valid = ", ".join(parent.model_fields) if parent else "?"
        return f"unknown key {where!r}; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"missing required key {where!r}"
    msg = err["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {msg}{extra}" if loc else f"{msg}{extra}"


def parse_recipe(data: Any, *, base_dir: str | os.PathLike | None = None, source: str | None = None):
    """Validate a recipe mapping; raise `ConfigError` (one line, naming the key) if invalid."""
    if not isinstance(data, dict):
        raise ConfigError(
            "a recipe must be a YAML mapping with keys kind, base_model, inputs, method, output", path=source
        )
    try:
        recipe = _RECIPE.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, data), path=source) from None
    return recipe.with_base_dir(base_dir if base_dir is not None else Path.cwd())


def load_recipe(path: str | os.PathLike):
    """Read and validate a YAML recipe file; relative paths in it resolve against its directory."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError("recipe file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML{where}: {problem}", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read recipe ({exc})", path=path) from None
    return parse_recipe(data, base_dir=path.resolve().parent, source=str(path))


def recipe_to_yaml(recipe, *, header: str | None = None) -> str:
    data = recipe.model_dump(mode="json", exclude_defaults=False)
    text = yaml.safe_dump(data, sort_keys=False)
    return (header or "") + text


# -- planning -------------------------------------------------------------------------------------
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
    """A local path (absolute, or relative to the recipe) as an absolute path, or a reachable Hub id."""
    local = Path(ref).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.exists():
        if not local.is_dir():
            raise InputError(f"{what} must be a directory", path=local)
        return str(local.resolve())
    if Path(ref).is_absolute() or not looks_like_repo_id(ref):
        raise InputError(f"{what} not found (no such directory, and not a Hub repo id)", path=local)
    resolve_source(ref, kind="config")  # reachability: config files only
    return ref


def _output_path(recipe, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).expanduser().resolve()
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
    from .device import resolve_device
    from .sinks.output import check_output_dir

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
    m = recipe.method
    if recipe.kind == "oft":
        kwargs: dict[str, Any] = {
            "weights": weights,
            "method": m.name,
            "granularity": m.granularity,
            "cayley": m.cayley,
            "scale": m.scale,
        }
        if recipe.output.format == "folded":
            kwargs["fold_into"] = base
        kwargs.update(overwrite=overwrite, device=device)
        return MergePlan(
            recipe, "merge_oft_checkpoints", [inputs, output_dir], kwargs, output_dir, inputs, base, device
        )
    common = {
        "weights": weights,
        "target": m.target,
        "residual": m.residual,
        "residual_kwargs": m.residual_kwargs,
        "solver": m.solver,
    }
    if m.precision != "float64":  # the API's default; plans of recipes without the key stay as they were
        common["precision"] = m.precision
    if recipe.kind == "full":
        kwargs = dict(common, include=m.include, exclude=m.exclude, device=device, overwrite=overwrite)
        return MergePlan(recipe, "merge_models", [base, inputs, output_dir], kwargs, output_dir, inputs, base, device)
    kwargs = dict(common, export=recipe.output.format)
    if recipe.output.format == "lora":
        kwargs["rank"] = m.rank
    notes = [
        f"model = AutoModelForCausalLM.from_pretrained({base!r}, dtype='auto', trust_remote_code=False) on {device}",
        f"result.save_pretrained({str(output_dir)!r}) with model card, report and recipe",
    ]
    return MergePlan(recipe, "merge_lora_adapters", ["model", inputs], kwargs, output_dir, inputs, base, device, notes)


# -- running --------------------------------------------------------------------------------------
def run_recipe(
    recipe,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    dry_run: bool = False,
    quiet: bool = False,
) -> MergeReport | MergePlan:
    """Run a validated recipe through the Python API; return its `MergeReport`.

    The output directory gets the API's files plus ``orthomerge_recipe.yaml`` (the validated
    recipe, inputs resolved to absolute paths or Hub ids), and the whole directory appears
    atomically. With ``dry_run=True`` nothing is written or computed beyond the checks of
    `plan_recipe`, and the `MergePlan` is returned instead.
    """
    from .progress import quiet as quiet_progress

    plan = plan_recipe(recipe, out=out, overwrite=overwrite, device=device)
    if dry_run:
        return plan
    with quiet_progress(quiet):
        return _execute(plan, overwrite=overwrite)


# API functions that split their work across the ranks of a torchrun / accelerate launch;
# the others run on rank 0 alone while the other ranks wait.
MULTI_PROCESS_FUNCTIONS = ("merge_models",)


def _execute(plan: MergePlan, *, overwrite: bool) -> MergeReport:
    """Run the plan into an atomic output directory (shared by all ranks under a launcher)."""
    from . import __version__
    from .sinks.parallel import distributed_output, process_context

    recipe = plan.recipe
    reproducible = recipe.model_copy(
        update={
            "inputs": [InputSpec(path=p, weight=s.weight) for p, s in zip(plan.inputs, recipe.inputs)],
            "base_model": plan.base_model,
        }
    )
    header = (
        f"# Written by peft-orthomerge {__version__}. Inputs are resolved to absolute paths or Hub ids.\n"
        f"# Reproduce with: peft-orthomerge merge {RECIPE_FILE} --out NEW_DIR\n"
    )
    sources = [*plan.inputs, *([plan.base_model] if plan.base_model else [])]
    ctx = process_context(plan.device)
    everywhere = plan.function in MULTI_PROCESS_FUNCTIONS

    def work(tmp: Path) -> MergeReport | None:
        if not (ctx.is_main or everywhere):
            return None
        if plan.function == "merge_lora_adapters":
            return _run_lora(plan, tmp)
        return _run_file_api(plan, tmp, lift=ctx.is_main)

    def finalize(tmp: Path, reports: list[MergeReport | None]) -> MergeReport:
        report = reports[0]
        report.output_path = str(plan.output_dir)
        report.to_json(tmp / REPORT_FILE)
        (tmp / RECIPE_FILE).write_text(recipe_to_yaml(reproducible, header=header))
        return report

    return distributed_output(ctx, plan.output_dir, work=work, finalize=finalize, inputs=sources, overwrite=overwrite)


def _run_file_api(plan: MergePlan, tmp: Path, *, lift: bool = True) -> MergeReport:
    """Call a file-writing API function into ``tmp/_merge``, then (``lift``) move its files into ``tmp``."""
    import peft_orthomerge

    fn = getattr(peft_orthomerge, plan.function)
    staging = tmp / "_merge"
    args = [staging if isinstance(a, Path) and a == plan.output_dir else a for a in plan.args]
    kwargs = dict(plan.kwargs, overwrite=False)
    report = fn(*args, **kwargs)
    if lift:
        for entry in staging.iterdir():
            entry.rename(tmp / entry.name)
        staging.rmdir()
    return report


def _run_lora(plan: MergePlan, tmp: Path) -> MergeReport:
    """Load the base with transformers, merge in memory, save the result with ``save_pretrained``."""
    from . import merge_lora_adapters
    from .progress import is_quiet
    from .sinks.card import write_model_card
    from .sinks.output import copy_base_side_files

    if is_quiet():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bars()
        disable_progress_bar()

    base_dir = resolve_source(plan.base_model, kind="model")
    model = _load_base_model(base_dir, plan.device)
    result = merge_lora_adapters(model, plan.inputs, **plan.kwargs)
    report = getattr(result, "orthomerge_report", None)
    if not isinstance(report, MergeReport):
        raise OrthoMergeError("merge_lora_adapters did not attach a MergeReport (orthomerge_report)")
    if plan.kwargs["export"] == "model":
        copy_base_side_files(base_dir, tmp)
        result.save_pretrained(tmp, safe_serialization=True)
        library = None
    else:
        result.save_pretrained(tmp)
        library = "peft"
    write_model_card(tmp, report, base_model=plan.base_model, library_name=library)
    return report


def _load_base_model(base_dir: Path, device: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot read the base model's config ({type(exc).__name__}: {exc})", path=base_dir) from None
    loader = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModel
    try:
        model = loader.from_pretrained(base_dir, dtype="auto", trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot load the base model ({type(exc).__name__}: {exc})", path=base_dir) from None
    return model.to(device).eval()
