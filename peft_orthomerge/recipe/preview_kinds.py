"""The per-kind part of `recipe.preview.preview_plan`: real readers and plan builders, headers only.

Each function takes the `MergePlan` and the inputs' local directories and returns the summary's
``groups`` (module type -> path -> tensor count), ``work`` and ``memory`` entries (estimates).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import IncompatibleInputsError
from ..sources.checkpoint import open_checkpoint, open_expert, rotated_tensors, validate_checkpoints
from ..sources.tensors import TensorReader
from ..units import human_bytes
from .plan import MergePlan
from .preview_facts import check_kind, group_paths, module_type, polar_factors

COMPUTE_BYTES = {"float64": 8, "float32": 4}


SKIPPED = "{what} is a Hub repo id: the checks against its tensor headers are skipped (they would download it)"


def is_local(ref: str) -> bool:
    return Path(ref).is_dir()


def _base(plan: MergePlan) -> tuple[Path, TensorReader] | None:
    """The base checkpoint opened (headers only), or ``None`` for a Hub id (not downloaded by a dry run)."""
    if not is_local(plan.base_model):
        return None
    check_kind(plan.base_model, Path(plan.base_model), "full", what="base_model")
    return open_checkpoint(plan.base_model, False)


def _shard_bytes(checkpoint_bytes: int) -> int:
    """The default output shard size of the streamed writer (1/16 of the base, 16 MiB .. 5 GiB)."""
    from ..api.decouple import MIN_SHARD_BYTES
    from ..sinks.output import DEFAULT_MAX_SHARD_BYTES

    return min(DEFAULT_MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, checkpoint_bytes // 16))


def _itemsize(reader: TensorReader, name: str) -> int:
    return reader.dtype(name).itemsize


def preview_oft(plan: MergePlan, dirs: list[Path]) -> dict[str, Any]:
    """OFT: `build_plan` on the adapters; for folded output `check_fold_targets` against the base."""
    from ..plan.oft import build_plan, check_fold_targets
    from ..plan.options import OftOptions
    from ..sources.oft import base_name, read_adapter_dir

    kw = plan.kwargs
    folded = "fold_into" in kw
    options = OftOptions(kw["method"], kw["granularity"], kw["cayley"], kw["scale"], "folded" if folded else "adapter")
    adapters = [read_adapter_dir(ref, d) for ref, d in zip(plan.inputs, dirs)]
    oft = build_plan(adapters, kw["weights"], options)
    adapter_bytes = sum(a.tensors.nbytes() for a in adapters)
    path = "folded" if folded else "oft"
    groups = group_paths([(f"{m.name}.weight", path) for m in oft.modules])
    blocks = sorted({(m.r, m.b) for m in oft.modules})
    work = {
        "modules": len(oft.modules),
        "blocks": sum(m.r for m in oft.modules),
        "block_shapes": [f"{r} x so({b})" for r, b in blocks],
        "text": f"{len(oft.modules)} modules, {sum(m.r for m in oft.modules)} skew blocks merged in so(b) "
        f"({', '.join(f'{r} blocks of {b}x{b}' for r, b in blocks)}) over {len(adapters)} adapters",
    }
    notes = [*oft.warnings, *oft.notes]
    if oft.passthrough:
        notes.append(f"{len(oft.passthrough)} pass-through tensors (modules_to_save, biases) merged as tensors")
    peak = 2 * adapter_bytes
    opened = _base(plan) if folded else None
    if folded and opened is None:
        notes.append(SKIPPED.format(what="base_model"))
    elif folded:
        base = opened[1]
        check_fold_targets(oft, base)
        folded_keys = {f"{m.name}.weight" for m in oft.modules} | {base_name(k) for k in oft.passthrough}
        groups = group_paths(
            [(f"{m.name}.weight", path) for m in oft.modules]
            + [(k, "copy") for k in base.keys() if k not in folded_keys]
        )
        largest = max((math.prod(base.shape(f"{m.name}.weight")) for m in oft.modules), default=0)
        peak += 3 * 8 * largest + _shard_bytes(base.nbytes())
        work["text"] += f"; each folded into its base weight (W0 @ blockdiag(R)^T), {len(base)} base tensors written"
    memory = {"peak_bytes": peak, "text": "adapters in memory" + (", largest folded weight, one shard" * folded)}
    return {"groups": groups, "work": work, "memory": memory, "notes": notes}


def _decouple_options(plan: MergePlan):
    from ..plan.options import DecoupleOptions

    kw = plan.kwargs
    return DecoupleOptions(
        kw["target"], kw["residual"], kw["residual_kwargs"], kw["solver"], kw.get("precision", "float64")
    )


def preview_full(plan: MergePlan, dirs: list[Path]) -> dict[str, Any]:
    """Full checkpoints: headers checked by `validate_checkpoints`, tensors planned by `plan_checkpoint`."""
    from ..plan.checkpoint import compile_patterns, plan_checkpoint

    options = _decouple_options(plan)
    inc = compile_patterns(plan.kwargs.get("include"), "include")
    exc = compile_patterns(plan.kwargs.get("exclude"), "exclude")
    if not all(is_local(r) for r in [plan.base_model, *plan.inputs]):
        return {"groups": {}, "work": {"text": "unknown"}, "memory": {"text": "unknown"},
                "notes": [SKIPPED.format(what="an input or the base_model")]}  # fmt: skip
    base_dir, base = _base(plan)
    readers = [open_expert(d, base, base_dir, False)[1] for d in dirs]  # kind: mixed: LoRA and OFT inputs too
    validate_checkpoints(base, readers)
    tasks = plan_checkpoint(base, base_dir, options, include=inc, exclude=exc, rotated=rotated_tensors(readers))
    n = len(readers)
    csize = COMPUTE_BYTES[options.precision]
    decoupled = [t for t in tasks if t.decoupled]
    shard = _shard_bytes(base.nbytes())
    peak, peak_name = 0, None
    for t in tasks:
        numel, side = math.prod(t.shape), t.shape[-1] if t.shape else 1
        stored = numel * _itemsize(base, t.name)
        if t.route == "tensor":
            need = 2 * stored + 3 * numel * csize + (3 * side * side * csize if t.decoupled else 0)
        else:
            need = stored + (2 * side * side * csize if t.decoupled else 0)
        if need > peak:
            peak, peak_name = need, t.name
    factors = polar_factors([t.shape[1] for t in decoupled], n)
    work = {
        "polar_factors": factors,
        "cost": sum(t.cost for t in tasks) * n,
        "text": _polar_text(factors, len(decoupled), n) + f"; {len(tasks) - len(decoupled)} tensors not decoupled",
    }
    memory = {
        "peak_bytes": peak + shard,
        "text": f"largest tensor step ({peak_name}: base and one expert in the storage dtype, the math in "
        f"{options.precision}) plus one output shard of {human_bytes(shard)}",
        "checkpoint_bytes": base.nbytes(),
    }
    groups = group_paths([(t.name, t.path) for t in tasks])
    notes = []
    if plan.kwargs.get("export") == "lora":
        work["text"] += f"; then a rank-{plan.kwargs['rank']} truncated SVD of each changed weight"
        notes.append(_lora_export_note(base_dir, base, tasks, plan.kwargs["rank"]))
    return {"groups": groups, "work": work, "memory": memory, "notes": notes}


def _lora_export_note(base_dir: Path, base: TensorReader, tasks: list, rank: int) -> str:
    """What a ``format: lora`` output of a checkpoint merge can hold, and what the merge must leave alone."""
    from ..sources.layout import lora_weight_modules

    modules = lora_weight_modules(base_dir, base.keys())
    kinds = Counter(kind for _, kind in modules.values())
    others = [t.name for t in tasks if t.name not in modules and t.path != "copy"]
    size = sum(rank * sum(t.shape) * max(4, _itemsize(base, t.name)) for t in tasks if t.name in modules)
    held = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return (
        f"LoRA export (rank {rank}): {len(modules)} weights a LoRA adapter can hold ({held}), at most "
        f"{human_bytes(size)}; the other {len(others)} floating tensors (norms, biases, ...) must come out "
        "of the merge equal to the base, else it is refused naming the tensor"
    )


def _polar_text(factors: dict[str, Any], weights: int, experts: int) -> str:
    if not factors["count"]:
        return "no polar factors (no tensor is decoupled)"
    sizes = ", ".join(f"{s['count']} of {s['size']}x{s['size']}" for s in factors["sizes"])
    return f"{factors['count']} polar factors (in x in, {weights} decoupled weights x {experts} experts): {sizes}"


def _base_key(base: TensorReader, key: str) -> str | None:
    """The base checkpoint's name for module weight ``key`` (with or without the model's prefix)."""
    tail = key.partition(".")[2]
    for candidate in (key, tail, f"model.{key}"):
        if candidate and candidate in base:
            return candidate
    return None


def _lora_math_shape(adapter, mod, base: TensorReader, label: str) -> tuple[int, int]:
    """Check one LoRA module against the base header; its weight's shape for the math ``(out, in)``."""
    src = adapter.source
    a, b = src.shape(mod.parts["A"]), src.shape(mod.parts["B"])
    key = _base_key(base, f"{mod.key}.weight")
    if key is None:
        raise IncompatibleInputsError(
            "LoRA target module is missing from the base model",
            path=label,
            tensor=mod.parts["A"],
            hint="Was this adapter trained on another base model?",
        )
    stored = base.shape(key)
    fan = bool(adapter.config.get("fan_in_fan_out", False))
    expected = (a[1], b[0]) if mod.kind == "embedding" else (b[0], a[1])
    if fan and mod.kind != "embedding":
        expected = expected[::-1]
    if len(stored) != 2 or tuple(stored) != tuple(expected):
        raise IncompatibleInputsError(
            f"LoRA weights imply a base weight of shape {tuple(expected)}, the base has {tuple(stored)}",
            path=label,
            tensor=mod.parts["A"],
            hint="Was this adapter trained on another base model?",
        )
    return tuple(stored[::-1]) if fan and mod.kind != "embedding" else tuple(stored)


TIED_TYPES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def _tied_embeddings(base_dir: Path) -> bool:
    """Whether the base's config ties input embeddings and output head (only when the config says so)."""
    from ..sources.jsonfile import read_json_object

    config = read_json_object(base_dir / "config.json", what="model config")
    return config.get("tie_word_embeddings") is True


def preview_lora(plan: MergePlan, dirs: list[Path]) -> dict[str, Any]:
    """LoRA: the adapters read by the real reader; every module and saved tensor checked against the base header."""
    from ..ops.decouple import decoupling_path
    from ..sources.lora import read_adapter_dir

    options = _decouple_options(plan)
    adapters = [read_adapter_dir(ref, d) for ref, d in zip(plan.inputs, dirs)]
    opened = _base(plan)
    if opened is None:
        return {"groups": {}, "work": {"text": "unknown"}, "memory": {"text": "unknown"},
                "notes": [SKIPPED.format(what="base_model")]}  # fmt: skip
    base = opened[1]
    shapes: dict[str, tuple[int, int]] = {}
    full: dict[str, tuple[int, ...]] = {}
    tied = _tied_embeddings(Path(plan.base_model))
    for adapter in adapters:
        for key, mod in adapter.modules.items():
            if tied and module_type(f"{key}.weight") in TIED_TYPES:
                raise IncompatibleInputsError(
                    "the base ties its input embeddings and lm_head (tie_word_embeddings); merging into one "
                    "would change both",
                    path=adapter.label,
                    tensor=mod.parts["A"],
                    hint="Untie the weights (config.tie_word_embeddings=False) or drop the module from the adapters.",
                )
            shapes.setdefault(key, _lora_math_shape(adapter, mod, base, adapter.label))
        for name, saved in adapter.full.items():
            target = _base_key(base, name)
            if target is None or base.shape(target) != adapter.source.shape(saved):
                raise IncompatibleInputsError(
                    "saved full tensor has no base tensor of the same shape", path=adapter.label, tensor=saved
                )
            full.setdefault(name, base.shape(target))
    if full and plan.kwargs.get("export") == "lora":
        raise IncompatibleInputsError(
            "the adapters save full tensors (modules_to_save or biases), which a LoRA export cannot hold",
            tensor=next(iter(full)),
            hint="Use output.format: model.",
        )

    def path(shape: tuple[int, ...]) -> str:
        if len(shape) != 2:
            return "euclidean"
        return decoupling_path(shape, options.target, options.residual, options.method_kwargs)

    items = [(f"{k}.weight", path(s)) for k, s in shapes.items()] + [(k, path(s)) for k, s in full.items()]
    decoupled = [s[1] for s in [*shapes.values(), *full.values()] if len(s) == 2 and options.target is not None]
    factors = polar_factors(decoupled, len(adapters))
    csize = COMPUTE_BYTES[options.precision]
    largest = max((s[0] * s[1] + 3 * s[1] * s[1] for s in shapes.values()), default=0)
    work = {"polar_factors": factors, "text": _polar_text(factors, len(decoupled), len(adapters))}
    if plan.kwargs.get("export") == "lora":
        work["text"] += f"; then a rank-{plan.kwargs.get('rank')} truncated SVD per merged module"
    memory = {
        "peak_bytes": base.nbytes() + 4 * largest * csize,
        "text": f"the base model loaded in its dtype ({human_bytes(base.nbytes())}) plus the math of the largest module",
    }
    return {"groups": group_paths(items), "work": work, "memory": memory, "notes": []}
