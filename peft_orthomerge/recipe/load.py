"""Reading and writing recipes: a mapping or YAML file to a validated recipe, and back to YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError, InputError
from .errors import format_error
from .mergekit import is_mergekit_config, mergekit_to_recipe
from .schema import RECIPE_ADAPTER, RecipeBase


def parse_recipe(data: Any, *, base_dir: str | os.PathLike | None = None, source: str | None = None) -> RecipeBase:
    """Validate a recipe mapping, or a mergekit config (`recipe.mergekit`: ``merge_method`` and no
    ``kind``, translated first); raise `ConfigError` (one line, naming the key) if invalid."""
    origin = "recipe"
    if is_mergekit_config(data):
        data, origin = mergekit_to_recipe(data, source=source), "mergekit"
    if not isinstance(data, dict):
        raise ConfigError(
            "a recipe must be a YAML mapping with keys kind, base_model, inputs, method, output", path=source
        )
    try:
        recipe = RECIPE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        prefix = "mergekit config (as translated): " if origin == "mergekit" else ""
        raise ConfigError(prefix + format_error(exc, data), path=source) from None
    return recipe.with_base_dir(base_dir if base_dir is not None else Path.cwd()).with_origin(origin)


def load_recipe(path: str | os.PathLike) -> RecipeBase:
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


def recipe_to_yaml(recipe: RecipeBase, *, header: str | None = None) -> str:
    data = recipe.model_dump(mode="json", exclude_defaults=False)
    text = yaml.safe_dump(data, sort_keys=False)
    return (header or "") + text
