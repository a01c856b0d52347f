"""The OFT adapter sink: a merged OFT merge written as an ordinary PEFT adapter directory.

The merged adapter is an ordinary `OFTConfig` adapter: its ``use_cayley_neumann`` flag is the plan's
output convention (the stored vector is converted to it), ``coft`` is off so that PEFT never
alters the stored vector, and ``target_modules`` lists the merged modules by full name. Stored
per module: ``oft_R`` (``oft_embedding_R`` for embeddings) of shape ``(r, b(b-1)/2)``, the strict
upper triangle of each block in ``torch.triu_indices(b, b, 1)`` order, in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..merge.oft import iter_merged_modules, merged_passthrough
from ..merge.oft_stats import OrthogonalityProbe, module_stats
from ..ops.skew import from_canonical
from ..plan.oft import OftPlan
from ..progress import progress
from ..report import MergeReport
from ..sources.oft import PREFIX
from .card import write_report_files
from .output import ShardedSafetensorsWriter, finalize_shards

OFT_KEY = {"linear": "oft_R", "embedding": "oft_embedding_R"}


def new_report(plan: OftPlan, inputs: list[str], output_path: str | None) -> MergeReport:
    return MergeReport(
        kind="oft",
        method=plan.options.method,
        inputs=inputs,
        weights=plan.weights,
        output_path=output_path,
        params=plan.params,
        passthrough=sorted(plan.passthrough),
        warnings=list(plan.warnings),
        notes=list(plan.notes),
    )


def common_value(values: list) -> object:
    """The value all inputs agree on, else ``None``."""
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
    return values[0] if len(distinct) == 1 else None


def output_base_model(plan: OftPlan, base_model: str | None) -> str | None:
    """The merged adapter's ``base_model_name_or_path``: ``base_model`` (the model or recipe base
    it was merged for), else the inputs' common value; a local directory as an absolute path, so
    that ``AutoPeftModel*.from_pretrained`` finds it from any working directory."""
    ref = (
        base_model
        if base_model is not None
        else common_value([a.config.get("base_model_name_or_path") for a in plan.adapters])
    )
    return base_model_ref(ref)


def base_model_ref(ref: object) -> str | None:
    """An adapter's ``base_model_name_or_path`` for ``ref``: a local directory as an absolute path
    (found from any working directory), a Hub id as it is, nothing as ``None``."""
    if not ref:
        return None
    local = Path(str(ref)).expanduser()
    return str(local.resolve()) if local.is_dir() else str(ref)


def _adapter_config(plan: OftPlan, base_model: str | None):
    from peft import OFTConfig

    configs = [a.config for a in plan.adapters]
    modes = {a.config.get("bias", "none") for a in plan.adapters} - {"none"}
    bias = modes.pop() if len(modes) == 1 else ("all" if modes else "none")
    to_save = sorted({m for a in plan.adapters for m in (a.config.get("modules_to_save") or [])})
    return OFTConfig(
        r=plan.oft_rank,
        oft_block_size=plan.oft_block_size,
        target_modules=sorted(mp.name for mp in plan.modules),
        use_cayley_neumann=plan.use_cayley_neumann,
        num_cayley_neumann_terms=plan.terms,
        block_share=plan.block_share,
        coft=False,
        bias=bias,
        modules_to_save=to_save or None,
        init_weights=True,
        inference_mode=True,
        base_model_name_or_path=output_base_model(plan, base_model),
        task_type=common_value([c.get("task_type") for c in configs]),
        auto_mapping=common_value([c.get("auto_mapping") for c in configs]),
    )


def write_adapter(
    plan: OftPlan, directory: str | Path, report: MergeReport, *, base_model: str | None = None
) -> MergeReport:
    """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` and the report JSON."""
    directory = Path(directory)
    writer = ShardedSafetensorsWriter(directory, prefix="adapter_model", max_shard_bytes=1 << 62)
    probe = OrthogonalityProbe(plan, report)
    for mp, merge in progress(
        iter_merged_modules(plan), desc="merging OFT modules", total=len(plan.modules), unit="module"
    ):
        stored = from_canonical(merge.vec, plan.use_cayley_neumann)
        if plan.block_share:
            stored = stored[:1]
        writer.add(f"{PREFIX}{mp.name}.{OFT_KEY[mp.kind]}.weight", stored.to(torch.float32))
        report.modules.append(probe.add(module_stats(mp, merge), mp, merge))
    probe.finish()
    for key in plan.passthrough:
        writer.add(key, merged_passthrough(plan, key))
    finalize_shards(directory, writer.close(), prefix="adapter_model")
    config = _adapter_config(plan, base_model)
    config.save_pretrained(str(directory))
    write_report_files(directory, report, base_model=config.base_model_name_or_path or None, library_name="peft")
    return report
