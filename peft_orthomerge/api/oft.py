"""Public API for OFT adapters: `merge_oft_adapters` (in memory) and `merge_oft_checkpoints` (files).

Both build the same `OftPlan` (validated before any work), merge each module's rotations in
so(b) (see `peft_orthomerge.ops.so_merge`) and write an ordinary PEFT OFT adapter, or, with
``fold_into``, the full folded model (``W0 @ blockdiag(R)^T`` per Linear weight, streamed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..merge.oft import FoldedOft
from ..plan.oft import build_plan, check_fold_targets
from ..plan.options import ORTHOGONALITY_BLOCKS, OftOptions
from ..report import MergeReport
from ..sinks.checkpoint import write_checkpoint
from ..sinks.oft_adapter import new_report, write_adapter
from ..sinks.output import atomic_output_dir, check_output_dir
from ..sinks.parallel import process_context
from ..sources.checkpoint import open_checkpoint
from ..sources.in_memory import ParameterShapes, check_plain_base
from ..sources.oft import OftAdapter, read_adapter_dir, read_loaded_adapter
from ..sources.resolve import resolve_source

Ref = str | os.PathLike


def _refs(adapters: Ref | Sequence[Ref]) -> list[Ref]:
    if isinstance(adapters, (str, os.PathLike)):
        return [adapters]
    refs = list(adapters)
    if not refs:
        raise ConfigError("no adapters to merge", hint="Pass at least one OFT adapter directory or Hub id.")
    return refs


def merge_oft_adapters(
    model: Any,
    adapters: Ref | Sequence[Ref],
    weights: Sequence[float] | None = None,
    *,
    adapter_name: str | None = None,
    method: str = "orthomerge",
    granularity: str = "module",
    cayley: str = "auto",
    scale: float = 1.0,
    device: str = "cpu",
    orthogonality_blocks: int | None = ORTHOGONALITY_BLOCKS,
):
    """Merge OFT adapters into a new adapter ``adapter_name`` of a `peft.PeftModel` and activate it.

    ``model`` is modified: PEFT injects the merged adapter's OFT layers into it (into its base
    model when it is a `PeftModel`). Pass a fresh base to later merges; a plain model that already
    carries PEFT layers is refused.

    Args:
        model: a transformers model (the base), or a `PeftModel` already holding adapters.
        adapters: adapter directories, Hub repo ids, or names of adapters loaded in ``model``.
        weights: task weights (normalised to sum 1; default uniform).
        adapter_name: name of the merged adapter (must be new). Default: ``"default"`` when ``model``
            holds no adapter, so that ``save_pretrained(dir)`` writes a directory that
            ``PeftModel.from_pretrained(base, dir)`` loads as it is; ``"merged"`` in a `PeftModel`
            that already holds adapters (PEFT saves it in ``dir/merged``).
        method: ``"orthomerge"`` (magnitude-corrected so(b) merge), ``"mean_q"``, ``"product_r"``
            (``"mean_r"`` and Euclidean methods give no rotation: use `merge_oft_checkpoints` with ``fold_into``).
        granularity: ``"module"`` or ``"block"``: over what the magnitude correction takes norms.
        cayley: ``"auto"`` (the inputs' common ``use_cayley_neumann``; exact Cayley if they differ),
            ``"exact"`` or ``"neumann"``: the merged adapter's flag.
        scale: multiplies the merged skew blocks.
        device: where the so(b) arithmetic runs.
        orthogonality_blocks: per module, how many merged blocks (those of largest norm) the report's
            orthogonality error is measured on; ``None``: every block (slower). See `peft_orthomerge.sinks.oft_adapter`.

    Returns:
        The `PeftModel` (``model`` itself if it was one); ``.orthomerge_report`` holds the `MergeReport`.
        PEFT's ``save_pretrained`` / ``push_to_hub`` / ``merge_and_unload`` work on it unchanged.
    """
    from peft import PeftModel

    refs = _refs(adapters)
    check_plain_base(model, "merge_oft_adapters")
    is_peft = isinstance(model, PeftModel)
    loaded = set(model.peft_config) if is_peft else set()
    if adapter_name is None:
        adapter_name = "merged" if loaded else "default"
    if adapter_name in loaded:
        raise ConfigError(
            f"adapter name {adapter_name!r} is already used in the model", hint="Pass another adapter_name."
        )
    options = OftOptions(method, granularity, cayley, scale, "memory", device, orthogonality_blocks)
    sources: list[OftAdapter] = [
        read_loaded_adapter(model, ref)
        if isinstance(ref, str) and ref in loaded
        else read_adapter_dir(str(ref), resolve_source(ref, kind="adapter"))
        for ref in refs
    ]
    plan = build_plan(sources, weights, options)
    base = model.get_base_model() if is_peft else model
    check_fold_targets(plan, ParameterShapes(base))  # PEFT would silently skip a module the model lacks
    report = new_report(plan, [str(r) for r in refs], None)
    base_name = getattr(base, "name_or_path", None) or None
    with tempfile.TemporaryDirectory(prefix="orthomerge-") as tmp:
        write_adapter(plan, tmp, report, base_model=base_name)
        if is_peft:
            model.load_adapter(tmp, adapter_name=adapter_name)
            model.set_adapter(adapter_name)
            result = model
        else:
            result = PeftModel.from_pretrained(model, tmp, adapter_name=adapter_name)
    result.orthomerge_report = report
    return result


def merge_oft_checkpoints(
    adapters: Ref | Sequence[Ref],
    output_dir: Ref,
    weights: Sequence[float] | None = None,
    *,
    method: str = "orthomerge",
    granularity: str = "module",
    cayley: str = "auto",
    scale: float = 1.0,
    fold_into: Ref | None = None,
    base_model: Ref | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    orthogonality_blocks: int | None = ORTHOGONALITY_BLOCKS,
) -> MergeReport:
    """Merge OFT adapter files tensor by tensor, without building a model; write atomically.

    Without ``fold_into``: a PEFT adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md`` model card, ``orthomerge_report.json``).
    With ``fold_into=<base model dir or Hub id>``: the full model with the merged rotation folded
    in (safetensors shards, config and tokenizer files), loadable with
    ``AutoModel*.from_pretrained``. Only folded export accepts ``method="mean_r"`` and the
    Euclidean baselines of `peft_orthomerge.ops.registry` (e.g. ``"ta"``, ``"ties"``), which
    merge the task vectors ``W_i - W0`` of the folded adapters.

    ``base_model``: the base the merged adapter is for (its ``base_model_name_or_path``; default:
    the inputs' common value; a local directory is written as an absolute path).
    Other arguments as in `merge_oft_adapters`; ``overwrite`` replaces a non-empty
    ``output_dir``; ``allow_pickle`` lets ``adapter_model.bin`` / ``model.bin`` load with
    ``torch.load(weights_only=True)``. Returns the `MergeReport`.
    """
    refs = _refs(adapters)
    if fold_into is None:
        options = OftOptions(method, granularity, cayley, scale, "adapter", device, orthogonality_blocks)
        dirs = [resolve_source(r, kind="adapter") for r in refs]
        plan = build_plan(
            [read_adapter_dir(str(r), d, allow_pickle=allow_pickle) for r, d in zip(refs, dirs)], weights, options
        )
        out = check_output_dir(output_dir, inputs=dirs, overwrite=overwrite)
        report = new_report(plan, [str(r) for r in refs], str(out))
        with atomic_output_dir(out, inputs=dirs, overwrite=overwrite) as tmp:
            write_adapter(plan, tmp, report, base_model=None if base_model is None else str(base_model))
        return report
    ctx = process_context(device)  # one process, or this rank of a torchrun / accelerate launch
    options = OftOptions(method, granularity, cayley, scale, "folded", str(ctx.device), orthogonality_blocks)
    dirs = [resolve_source(r, kind="adapter") for r in refs]
    plan = build_plan(
        [read_adapter_dir(str(r), d, allow_pickle=allow_pickle) for r, d in zip(refs, dirs)], weights, options
    )
    base_dir, base = open_checkpoint(fold_into, allow_pickle)
    inputs = [*dirs, base_dir]
    out = check_output_dir(output_dir, inputs=inputs, overwrite=overwrite)
    check_fold_targets(plan, base)
    report = new_report(plan, [str(r) for r in refs], str(out))
    jobs = FoldedOft(plan, base, report)
    return write_checkpoint(
        ctx, out, jobs, report, base_dir=base_dir, base_ref=str(fold_into), inputs=inputs, overwrite=overwrite,
        desc="folding",
    )  # fmt: skip
