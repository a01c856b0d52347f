"""Running a recipe: the planned API call into an atomic output directory, with report and recipe.

Nothing here changes process-wide state beyond the run: progress settings (ours, and those of
huggingface_hub / transformers) are switched in context managers that restore them on exit.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, OrthoMergeError
from ..progress import is_quiet, library_progress_bars_off
from ..progress import quiet as quiet_progress
from ..report import MergeReport
from ..sources.resolve import pinned, resolve_source
from .load import recipe_to_yaml
from .plan import MergePlan, plan_recipe
from .schema import InputSpec

RECIPE_FILE = "orthomerge_recipe.yaml"

# API functions that split their work across the ranks of a torchrun / accelerate launch;
# the others run on rank 0 alone while the other ranks wait.
MULTI_PROCESS_FUNCTIONS = ("merge_models",)


def runs_on_every_rank(plan: MergePlan) -> bool:
    """Whether the API call writes a full checkpoint through the multi-process sink (every rank takes part)."""
    return plan.function in MULTI_PROCESS_FUNCTIONS or plan.kwargs.get("fold_into") is not None


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
    plan = plan_recipe(recipe, out=out, overwrite=overwrite, device=device)
    if dry_run:
        return plan
    with quiet_progress(quiet):
        return _execute(plan, overwrite=overwrite)


def _reproducible(plan: MergePlan):
    """The recipe as written next to the output: inputs and base resolved to absolute paths or Hub
    ids, each Hub id pinned to the commit it resolved to (``org/name@<commit>``, `pinned`)."""
    recipe = plan.recipe
    return recipe.model_copy(
        update={
            "inputs": [InputSpec(path=pinned(p), weight=s.weight) for p, s in zip(plan.inputs, recipe.inputs)],
            "base_model": pinned(plan.base_model) if plan.base_model else None,
        }
    )


def _execute(plan: MergePlan, *, overwrite: bool) -> MergeReport:
    """Run the plan into an atomic output directory (shared by all ranks under a launcher)."""
    from .. import __version__
    from ..sinks.card import write_report_json
    from ..sinks.parallel import distributed_output, process_context

    header = (
        f"# Written by peft-orthomerge {__version__}. Inputs are resolved to absolute paths or Hub ids"
        " (pinned to the commit read).\n"
        f"# Reproduce with: peft-orthomerge merge {RECIPE_FILE} --out NEW_DIR\n"
    )
    if plan.recipe.origin == "mergekit":
        header += "# Translated from a mergekit config (peft_orthomerge.recipe.mergekit).\n"
    sources = [*plan.inputs, *([plan.base_model] if plan.base_model else [])]
    ctx = process_context(plan.device)
    everywhere = runs_on_every_rank(plan)

    def work(tmp: Path) -> MergeReport | None:
        if not (ctx.is_main or everywhere):
            return None
        if plan.function == "merge_lora_adapters":
            return _run_lora(plan, tmp)
        return _run_file_api(plan, tmp, lift=ctx.is_main)

    def finalize(tmp: Path, reports: list[MergeReport | None]) -> MergeReport:
        report = reports[0]
        report.output_path = str(plan.output_dir)
        write_report_json(tmp, report, base_model=plan.base_model)
        (tmp / RECIPE_FILE).write_text(recipe_to_yaml(_reproducible(plan), header=header))
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
    """Load the base with transformers, merge in memory, save the result with ``save_pretrained``.

    When progress is silenced, the progress bars of huggingface_hub and transformers are off for
    the run only (restored after, see `library_progress_bars_off`)."""
    from .. import merge_lora_adapters
    from ..sinks.card import write_report_files
    from ..sinks.output import copy_base_side_files

    with library_progress_bars_off(is_quiet()):
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
    write_report_files(tmp, report, base_model=plan.base_model, library_name=library)
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
