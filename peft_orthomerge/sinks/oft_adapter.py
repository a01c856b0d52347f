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
from ..plan.oft import ModulePlan, OftPlan
from ..progress import progress
from ..report import MergeReport
from ..sources.oft import PREFIX
from .card import write_report_files
from .output import StreamedSafetensorsFile

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


def oft_key(mp: ModulePlan) -> str:
    """The merged adapter's key of module ``mp`` (``oft_R`` or ``oft_embedding_R``)."""
    return f"{PREFIX}{mp.name}.{OFT_KEY[mp.kind]}.weight"


def adapter_tensor_specs(plan: OftPlan) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of the merged adapter file, known before any merge:
    per module float32 ``(r, b(b-1)/2)`` (``r = 1`` with ``block_share``), per pass-through tensor
    the dtype and shape of its first holder (`merged_passthrough` keeps them)."""
    specs = {
        oft_key(mp): (torch.float32, (1 if plan.block_share else mp.r, mp.b * (mp.b - 1) // 2)) for mp in plan.modules
    }
    for key, holders in plan.passthrough.items():
        tensors = plan.adapters[holders[0]].tensors
        specs[key] = (tensors.dtype(key), tuple(tensors.shape(key)))
    return specs


def write_adapter(
    plan: OftPlan, directory: str | Path, report: MergeReport, *, base_model: str | None = None
) -> MergeReport:
    """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` and the report JSON.

    The safetensors file is streamed (`StreamedSafetensorsFile`): each module is written as soon as
    it is merged, so only one merged module is in memory (and the inputs of two groups of modules,
    `merge.oft.CanonicalInputs`); the file is byte-identical to ``save_file`` of the merged tensors.
    """
    directory = Path(directory)
    probe = OrthogonalityProbe(plan, report)
    specs = adapter_tensor_specs(plan)
    with StreamedSafetensorsFile(directory / "adapter_model.safetensors", specs, metadata={"format": "pt"}) as file:
        for mp, merge in progress(
            iter_merged_modules(plan), desc="merging OFT modules", total=len(plan.modules), unit="module"
        ):
            stored = from_canonical(merge.vec, plan.use_cayley_neumann)
            if plan.block_share:
                stored = stored[:1]
            file.write(oft_key(mp), stored.to(torch.float32))
            report.modules.append(probe.add(module_stats(mp, merge), mp, merge))
        probe.finish()
        for key in plan.passthrough:
            file.write(key, merged_passthrough(plan, key))
    config = _adapter_config(plan, base_model)
    config.save_pretrained(str(directory))
    write_report_files(directory, report, base_model=config.base_model_name_or_path or None, library_name="peft")
    return report
