"""The recipe schema: pydantic models, one per kind (``oft``, ``lora``, ``full``, ``mixed``).

Method names are read from the method registry (`peft_orthomerge.ops.registry`), and the
``residual_kwargs`` of the decoupled kinds are validated by its `check_params` (plus ``seed``, the
per-tensor generator seed of the decoupled merges), so that a misspelt or out-of-range parameter
is an error of the recipe, found before any work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import ConfigError
from ..ops.registry import SEED, check_params, get_method, method_names

KINDS = ("oft", "lora", "full", "mixed")


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("paths cannot contain NUL bytes")
    return value


PathStr = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]


class InputSpec(Strict):
    """One input: a local directory or Hub repo id, and its (unnormalised) task weight."""

    path: PathStr
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)


class OftMethod(Strict):
    """Options of `merge_oft_checkpoints` (``name`` is its ``method`` keyword)."""

    name: str = "orthomerge"
    granularity: Literal["module", "block"] = "module"
    cayley: Literal["auto", "exact", "neumann"] = "auto"
    scale: float = Field(default=1.0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _known_method(cls, value: str) -> str:
        """Rotation methods (adapter or folded output) or Euclidean baselines on folded weights."""
        valid = method_names()
        if value not in valid:
            raise ValueError(f"unknown OFT method {value!r}; valid: {', '.join(valid)}")
        return value


class DecoupleMethod(Strict):
    """Options shared by `merge_lora_adapters` and `merge_models`.

    ``name: euclidean`` is the plain Euclidean baseline (``target=None``): the residual method
    alone merges the task vectors.
    """

    name: Literal["orthomerge", "euclidean"] = "orthomerge"
    target: Literal["global", "conflict"] | None = "global"
    residual: str = "ta"
    residual_kwargs: dict[str, float | int | bool | str | None] | None = None
    solver: Literal["auto", "svd", "eigh", "newton_schulz"] = "auto"

    @field_validator("residual")
    @classmethod
    def _known_residual(cls, value: str) -> str:
        valid = method_names("euclidean")
        if value not in valid:
            raise ValueError(f"unknown residual method {value!r}; valid: {', '.join(valid)}")
        return value

    @field_validator("residual_kwargs")
    @classmethod
    def _declared_params(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        residual = info.data.get("residual")
        if value is not None and residual is not None:  # residual is None when it failed its own check
            try:
                check_params(residual, value, extra=(SEED,))
            except ConfigError as exc:
                raise ValueError(exc.message) from None
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
    def _orthomerge_has_target(self) -> DecoupleMethod:
        if self.name == "orthomerge" and self.target is None:
            raise ValueError("target null means no rotation; write 'name: euclidean' instead")
        return self


Precision = Literal["float64", "float32"]  # the API's ``precision``: compute dtype of the merge


class LoraMethod(DecoupleMethod):
    rank: int | None = Field(default=None, ge=1)
    precision: Precision = "float64"


class FullMethod(DecoupleMethod):
    include: str | None = None
    exclude: str | None = None
    precision: Precision = "float64"
    rank: int | None = Field(default=None, ge=1)  # output format 'lora' only, as for kind: lora

    @field_validator("include", "exclude")
    @classmethod
    def _is_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from exc
        return value


class Output(Strict):
    path: PathStr


class OftOutput(Output):
    format: Literal["adapter", "folded"] = "adapter"


class LoraOutput(Output):
    format: Literal["model", "lora"] = "model"


class FullOutput(Output):
    """``model``: the merged full model; ``lora``: a LoRA adapter of rank ``method.rank`` instead."""

    format: Literal["model", "lora"] = "model"


class RecipeBase(Strict):
    base_model: PathStr | None = None
    inputs: list[InputSpec] = Field(min_length=1)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _origin: str = PrivateAttr(default="recipe")

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths resolve against (the recipe file's directory)."""
        return self._base_dir

    def with_base_dir(self, directory: str | os.PathLike) -> RecipeBase:
        self._base_dir = Path(directory).resolve()
        return self

    @property
    def origin(self) -> str:
        """``"recipe"`` (this library's format) or ``"mergekit"`` (translated by `recipe.mergekit`)."""
        return self._origin

    def with_origin(self, origin: str) -> RecipeBase:
        self._origin = origin
        return self


class OftRecipe(RecipeBase):
    kind: Literal["oft"]
    method: OftMethod = OftMethod()
    output: OftOutput

    @model_validator(mode="after")
    def _check(self) -> OftRecipe:
        if self.output.format == "folded" and not self.base_model:
            raise ValueError("output format 'folded' needs base_model (the model to fold the merged adapter into)")
        if not get_method(self.method.name).orthogonal and self.output.format != "folded":
            raise ValueError(
                f"method {self.method.name!r} does not give a rotation and can only be exported folded (output.format: folded)"
            )
        return self


def check_rank(output_format: str, rank: int | None) -> None:
    """``method.rank`` is given exactly when the output is a LoRA adapter."""
    if output_format == "lora" and rank is None:
        raise ValueError("output format 'lora' needs method.rank (rank of the merged LoRA adapter)")
    if output_format == "model" and rank is not None:
        raise ValueError("method.rank only applies to output format 'lora'")


class LoraRecipe(RecipeBase):
    kind: Literal["lora"]
    method: LoraMethod = LoraMethod()
    output: LoraOutput

    @model_validator(mode="after")
    def _check(self) -> LoraRecipe:
        if not self.base_model:
            raise ValueError("kind 'lora' needs base_model (the model the adapters were trained on)")
        check_rank(self.output.format, self.method.rank)
        return self


class FullRecipe(RecipeBase):
    kind: Literal["full"]
    method: FullMethod = FullMethod()
    output: FullOutput

    @model_validator(mode="after")
    def _check(self) -> FullRecipe:
        if not self.base_model:
            raise ValueError(f"kind '{self.kind}' needs base_model (the model the inputs were fine-tuned from)")
        check_rank(self.output.format, self.method.rank)
        return self


class MixedRecipe(FullRecipe):
    """Full checkpoints, LoRA and OFT adapters of one base in one `merge_models` run (method keys as ``full``)."""

    kind: Literal["mixed"]


Recipe = Annotated[OftRecipe | LoraRecipe | FullRecipe | MixedRecipe, Field(discriminator="kind")]
RECIPE_ADAPTER = TypeAdapter(Recipe)
MODELS: dict[str, type[RecipeBase]] = {"oft": OftRecipe, "lora": LoraRecipe, "full": FullRecipe, "mixed": MixedRecipe}
