"""Turning a pydantic `ValidationError` of a recipe into our one-line message (for `ConfigError`).

The first problem is reported, naming the key by its dotted path (``method.residual_kwargs``) and,
for unknown keys, listing the valid keys at that place; the count of further problems follows.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from .schema import KINDS, MODELS


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
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


def format_error(exc: ValidationError, data: Any) -> str:
    """One line describing the first error of ``exc`` (raised validating the recipe mapping ``data``)."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    kind = data.get("kind") if isinstance(data, dict) else None
    kinds = ", ".join(KINDS)
    if err["type"] == "union_tag_not_found":
        return f"missing key 'kind' (one of: {kinds})"
    if err["type"] == "union_tag_invalid":
        return f"unknown kind {err['ctx']['tag']!r}; valid kinds: {kinds}"
    if kind in MODELS and loc and loc[0] == kind:
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden" and kind in MODELS:
        parent = model_at(MODELS[kind], loc[:-1])
        valid = ", ".join(parent.model_fields) if parent else "?"
        return f"unknown key {where!r}; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"missing required key {where!r}"
    msg = err["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {msg}{extra}" if loc else f"{msg}{extra}"
