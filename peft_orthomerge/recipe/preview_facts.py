"""The small facts both halves of ``merge --dry-run`` share (`preview` and `preview_kinds`): each
input's kind against the recipe's, tensor names grouped by module type and path, and polar-factor
counts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import IncompatibleInputsError
from ..sources.checkpoint import input_kind

KIND_NAMES = {"oft": "OFT adapter", "lora": "LoRA adapter", "full": "full checkpoint"}


# the input kinds each recipe kind accepts
ACCEPTED = {"oft": ("oft",), "lora": ("lora",), "full": ("full",), "mixed": ("full", "lora", "oft")}


def check_kind(ref: str, directory: Path, expected: str, *, what: str = "input") -> str:
    """The input's kind; `IncompatibleInputsError` naming it and the recipe kind to use when the
    recipe kind ``expected`` does not accept it."""
    kind = input_kind(directory)
    if kind in ACCEPTED.get(expected, (expected,)):
        return kind
    name = KIND_NAMES.get(kind, f"a {kind} directory" if kind != "unknown" else "neither adapter nor checkpoint")
    article = "an" if name[0] in "aeiouAEIOU" else "a"
    described = name if kind == "unknown" else f"{article} {name}"
    if what != "input":
        raise IncompatibleInputsError(f"{what} {ref} is {described}; it must be a full model checkpoint")
    hint = f"; use kind: {kind}" if kind in KIND_NAMES else ""
    if expected == "full" and kind in ("lora", "oft"):
        hint += " (or kind: mixed, for full checkpoints, LoRA and OFT adapters in one merge)"
    raise IncompatibleInputsError(f"{what} {ref} is {described}, but the recipe has kind: {expected}{hint}")


def module_type(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``; a bias keeps its suffix (``q_proj.bias``)."""
    parts = name.split(".")
    if len(parts) == 1:
        return name
    if parts[-1] == "weight":
        return parts[-2]
    return f"{parts[-2]}.{parts[-1]}"


def group_paths(items: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``[(tensor name, path)]`` -> module type -> path -> count, in first-seen order."""
    groups: dict[str, Counter] = {}
    for name, path in items:
        groups.setdefault(module_type(name), Counter())[path] += 1
    return {k: dict(v) for k, v in groups.items()}


def polar_factors(sizes: list[int], experts: int) -> dict[str, Any]:
    """Polar factors of a decoupled merge: one ``in x in`` factor per decoupled weight per expert."""
    counts = Counter(sizes)
    return {
        "count": len(sizes) * experts,
        "sizes": [{"size": s, "weights": c, "count": c * experts} for s, c in sorted(counts.items())],
    }
