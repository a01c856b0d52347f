"""The deep checks and the summary of ``merge --dry-run``: what the real run would refuse, and what it will do.

`preview_plan` takes a `MergePlan` (from `plan_recipe`) and, reading headers only, runs the same
readers and plan builders as the real merge: each input's kind against the recipe's kind, the OFT
plan (`plan.oft.build_plan`, and `check_fold_targets` against the base for folded output), the full
checkpoints' headers (`validate_checkpoints`) and per-tensor plan (`plan.checkpoint.plan_checkpoint`),
and the LoRA and OFT adapters' modules against the base checkpoint's tensor shapes. It returns a JSON-able
summary: inputs and kinds, per module type how many tensors take which path, the output layout, and
an estimate of the work (polar factors) and of peak memory. No tensor data is read, nothing is written.
"""

from __future__ import annotations

from typing import Any

from ..sources.resolve import resolve_source
from ..units import human_bytes
from .plan import MergePlan
from .preview_facts import KIND_NAMES, check_kind
from .preview_kinds import preview_full, preview_lora, preview_oft

OUTPUT_LAYOUTS = {
    ("oft", "adapter"): "PEFT OFT adapter (adapter_config.json, adapter_model.safetensors)",
    (
        "oft",
        "folded",
    ): "full model, merged rotation folded in (safetensors shards in the base dtype, config, tokenizer)",
    ("lora", "model"): "full model saved by transformers' save_pretrained (base dtype)",
    ("lora", "lora"): "PEFT LoRA adapter 'default' (truncated SVD of each merged delta)",
    ("full", "model"): "full model (safetensors shards in the base dtype, config, tokenizer)",
    ("mixed", "model"): "full model (safetensors shards in the base dtype, config, tokenizer)",
    ("full", "lora"): "PEFT LoRA adapter 'default' (truncated SVD of each merged delta of a Linear, "
    "Embedding or Conv1D weight)",
    ("mixed", "lora"): "PEFT LoRA adapter 'default' (truncated SVD of each merged delta of a Linear, "
    "Embedding or Conv1D weight)",
}
OUTPUT_EXTRAS = "README.md (model card), orthomerge_report.json, orthomerge_recipe.yaml"


def preview_plan(plan: MergePlan) -> dict[str, Any]:
    """Run every header-level check of the real merge and summarise it (see the module docstring)."""
    recipe = plan.recipe
    what = "adapter" if recipe.kind in ("oft", "lora") else "config"  # a dry run downloads no checkpoint
    dirs = [resolve_source(ref, kind=what) for ref in plan.inputs]
    kinds = [check_kind(ref, d, recipe.kind) for ref, d in zip(plan.inputs, dirs)]
    total = sum(s.weight for s in recipe.inputs)
    summary: dict[str, Any] = {
        "kind": recipe.kind,
        "call": plan.describe(),
        "inputs": [
            {"ref": ref, "path": str(d), "kind": k, "weight": s.weight / total}
            for ref, d, k, s in zip(plan.inputs, dirs, kinds, recipe.inputs)
        ],
        "base_model": plan.base_model,
        "output": {
            "path": str(plan.output_dir),
            "format": recipe.output.format,
            "layout": OUTPUT_LAYOUTS[(recipe.kind, recipe.output.format)],
            "files": OUTPUT_EXTRAS,
        },
        "notes": [],
    }
    build = {"oft": preview_oft, "lora": preview_lora, "full": preview_full, "mixed": preview_full}[recipe.kind]
    summary.update(build(plan, dirs))
    return summary


PATH_ORDER = ("oft", "folded", "rows", "reduced", "dense", "euclidean", "copy")
PATH_TITLES = {"oft": "OFT adapter space", "folded": "OFT, folded into the base"}


def _table(groups: dict[str, dict[str, int]]) -> list[str]:
    used = [p for p in PATH_ORDER if any(p in g for g in groups.values())]
    used += sorted({p for g in groups.values() for p in g} - set(used))
    width = max([len("module type"), *(len(k) for k in groups)])
    lines = ["  " + f"{'module type':<{width}}" + "".join(f"{p:>11}" for p in used) + f"{'total':>8}"]
    for name, counts in groups.items():
        cells = "".join(f"{counts.get(p, 0) or '-':>11}" for p in used)
        lines.append(f"  {name:<{width}}{cells}{sum(counts.values()):>8}")
    totals = {p: sum(g.get(p, 0) for g in groups.values()) for p in used}
    lines.append(f"  {'all':<{width}}" + "".join(f"{totals[p]:>11}" for p in used) + f"{sum(totals.values()):>8}")
    titles = [f"{p}: {PATH_TITLES[p]}" for p in used if p in PATH_TITLES]
    return lines + ([f"  ({'; '.join(titles)})"] if titles else [])


def format_preview(summary: dict[str, Any]) -> str:
    """The text of `preview_plan`'s summary (what ``merge --dry-run`` prints)."""
    lines = [f"dry run: {summary['kind']} merge of {len(summary['inputs'])} inputs -> {summary['output']['path']}"]
    lines.append("inputs:")
    for i, info in enumerate(summary["inputs"]):
        where = "" if info["path"] == info["ref"] else f"  at {info['path']}"
        kind = KIND_NAMES.get(info["kind"], info["kind"])
        lines.append(f"  [{i}] {info['ref']}  ({kind}, weight {info['weight']:.4g}){where}")
    if summary["base_model"]:
        lines.append(f"base model: {summary['base_model']}")
    lines.append("call: " + summary["call"].replace("\n", "\n  "))
    if summary["groups"]:
        lines.append("tensors per module type and path:")
        lines.extend(_table(summary["groups"]))
    out = summary["output"]
    lines.append(f"output: {out['path']} ({out['format']}): {out['layout']}; with {out['files']}")
    lines.append(f"work: {summary['work']['text']}")
    memory = summary["memory"]
    peak = f"about {human_bytes(memory['peak_bytes'])}: " if "peak_bytes" in memory else ""
    lines.append(f"peak memory (estimate): {peak}{memory['text']}")
    lines.extend(f"note: {n}" for n in summary["notes"])
    return "\n".join(lines)
