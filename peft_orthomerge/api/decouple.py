"""Public API of orthogonal-residual decoupling: `merge_lora_adapters` and `merge_models`.

Both validate their options once (`plan.options.DecoupleOptions`), read their inputs through
`sources`, plan the tensors (`plan.lora`, `plan.checkpoint`), merge them (`merge.lora`,
`merge.checkpoint`) and hand the result to a sink: the model in memory, a LoRA adapter, or the
streamed checkpoint writer (`sinks.checkpoint`, one process or many). Layout: the rotation acts
on the input side of the torch-layout weight ``(out, in)``; embeddings and ``lm_head``
(``(vocab, hidden)``) are rotated on the hidden side; GPT-2 ``Conv1D`` weights (stored
``(in, out)``) are transposed for the math.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..merge.checkpoint import CheckpointMerge
from ..merge.lora import merge_full_tensors, merge_lora_modules
from ..ops.weights import normalize_weights
from ..plan.checkpoint import compile_patterns, plan_checkpoint
from ..plan.lora import plan_full_tensors, plan_lora
from ..plan.options import DecoupleOptions
from ..report import MergeReport
from ..sinks.checkpoint import write_checkpoint
from ..sinks.lora_adapter import LoraExport, export_lora, write_lora_export
from ..sinks.model import write_into_model
from ..sinks.oft_adapter import base_model_ref, common_value
from ..sinks.output import DEFAULT_MAX_SHARD_BYTES, check_output_dir, parse_size
from ..sinks.parallel import process_context
from ..sources.checkpoint import open_checkpoint, open_expert, rotated_tensors, validate_checkpoints
from ..sources.in_memory import check_plain_base
from ..sources.jsonfile import read_json_object
from ..sources.layout import lora_weight_modules
from ..sources.lora import LoraAdapter, read_adapter_dir, read_loaded_adapter
from ..sources.resolve import resolve_source

Ref = str | os.PathLike
EXPORTS = ("model", "lora")
MIN_SHARD_BYTES = 16 * 1024**2


def _refs(items: Ref | Sequence[Ref]) -> list[Ref]:
    if isinstance(items, (str, os.PathLike)):
        return [items]
    return list(items)


def _check_export(export: str, rank: int | None) -> None:
    if export not in EXPORTS:
        raise ConfigError(f"unknown export {export!r}; valid: 'model', 'lora'")
    if export == "lora" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"export='lora' needs a positive integer rank, got {rank!r}")


def _lora_sources(model: Any, refs: Sequence[Ref]) -> list[LoraAdapter]:
    """Each reference read as an adapter loaded in ``model`` (by name) or from its directory / Hub id."""
    from peft import PeftModel

    loaded = set(model.peft_config) if isinstance(model, PeftModel) else set()
    return [
        read_loaded_adapter(model, ref)
        if isinstance(ref, str) and ref in loaded
        else read_adapter_dir(str(ref), resolve_source(ref, kind="adapter"))
        for ref in refs
    ]


def merge_lora_adapters(
    model: Any,
    adapters: Ref | Sequence[Ref],
    weights: Sequence[float] | None = None,
    *,
    target: str | None = "global",
    residual: str = "ta",
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    export: str = "model",
    rank: int | None = None,
    precision: str = "float64",
):
    """Merge LoRA adapters by orthogonal-residual decoupling (paper Algorithm 2).

    Each adapted weight ``W_i = W0 + delta_i`` (PEFT's exact fold: scaling, rsLoRA, rank/alpha
    patterns, ``fan_in_fan_out``, embeddings, DoRA) is split into a rotation ``W0 @ P_i`` and a
    residual; rotations merge in so(in), residuals with ``residual``. A module an adapter does not
    touch has a zero task vector for that adapter; adapters may have different ranks and targets.

    ``model`` is modified: with ``export="model"`` the merged weights are written into its modules
    in place; with ``export="lora"`` PEFT injects the new adapter's layers into it. A `PeftModel`
    is unloaded first (its LoRA layers removed). A plain model that already carries PEFT layers
    (for example a base given to `merge_oft_adapters` before) is refused.

    Args:
        model: the base transformers model, or a `PeftModel` holding LoRA adapters (its LoRA layers
            are removed with ``unload()``; the base weights are used).
        adapters: adapter directories, Hub ids, or names of adapters loaded in ``model``.
        weights: task weights (normalised to sum 1; default uniform).
        target: ``"global"`` (``W_i``), ``"conflict"`` (conflict-aware rows) or ``None`` (plain
            Euclidean merge of the task vectors, the baseline).
        residual: ``"ta"``, ``"ties"``, ``"dare_ta"``, ``"dare_ties"``, ``"tsvm"`` (defaults in
            `peft_orthomerge.ops.euclidean`; ``"ta"`` with ``{"lam": L}`` gives ``L * sum rho_i``
            for uniform weights, default ``L = 1/N``). ``seed`` seeds DARE.
        solver: polar solver, ``"auto"`` (CPU: ``"eigh"`` in float64, else ``"svd"``; CUDA:
            ``"newton_schulz"``), ``"svd"``, ``"eigh"`` or ``"newton_schulz"`` (`ops.procrustes`).
        export: ``"model"``: the transformers model with merged weights in place; ``"lora"``: a
            `PeftModel` whose adapter ``"default"`` (rank ``rank``, ``lora_alpha = rank``) is the
            truncated SVD of each merged delta; the relative approximation error is reported.
        rank: LoRA rank for ``export="lora"``.
        precision: compute dtype of the merge, ``"float64"`` (default: the reference, agrees with
            an independent float64 computation to rounding, ~1e-12 relative) or ``"float32"``
            (about 2.7x faster than a dense fp32 implementation, half the memory of the math;
            merged weights within a few 1e-6 relative of float64 (measured ~4e-6 on a Llama-shaped
            benchmark, ~1e-6 on the merged updates of the test model), far below the bf16 / fp16
            storage resolution, ~4e-3 / 5e-4), on weights whose float32 error estimate allows it
            (`ops.precision`: ``4 eps kappa(W0) <= 1e-4``); an ill-conditioned weight (SmolLM2's
            q/o, ``kappa(W0)`` 5e4, were 2e-2 off in float32) is decoupled in float64, and its
            report entry gives the estimate. Outputs are cast to the base dtype either way.
            LoRA biases always merge in float64.

    Returns:
        The model (``export="model"``) or a new `PeftModel` (``export="lora"``), with
        ``.orthomerge_report`` holding the `MergeReport`.
    """
    from peft import PeftModel

    refs = _refs(adapters)
    weights_n = normalize_weights(weights, len(refs))
    options = DecoupleOptions(target, residual, residual_kwargs, solver, precision)
    _check_export(export, rank)
    check_plain_base(model, "merge_lora_adapters")
    sources = _lora_sources(model, refs)
    base = model.unload() if isinstance(model, PeftModel) else model
    plan = plan_lora(base, sources)
    full = plan_full_tensors(base, sources, plan)
    if full and export == "lora":
        raise ConfigError(
            "the adapters save full tensors (modules_to_save or biases), which a LoRA export cannot hold",
            tensor=next(iter(full)),
            hint="Use export='model'.",
        )
    params = {**options.params(), "export": export, "rank": rank, "precision": precision}
    report = MergeReport(
        kind="lora", method=options.method_name, inputs=[str(r) for r in refs], weights=weights_n, params=params
    )
    with torch.no_grad():
        merged = merge_lora_modules(plan, sources, weights_n, options, report, export)
        merged_full = merge_full_tensors(full, sources, weights_n, options, report)
        if export == "model":
            write_into_model(plan, merged, full, merged_full)
            base.orthomerge_report = report
            return base
        result = export_lora(base, plan, merged, rank, report)
    result.orthomerge_report = report
    return result


def _shard_bytes(max_shard_size: int | str | None, checkpoint_bytes: int) -> int:
    """The output shard size: as given, or 1/16 of the base checkpoint between 16 MiB and 5 GiB."""
    if max_shard_size is not None:
        return parse_size(max_shard_size)
    return min(DEFAULT_MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, checkpoint_bytes // 16))


def _adapter_task_type(directories: Sequence[Path]) -> str | None:
    """The ``task_type`` the adapter inputs agree on (full checkpoints have none), else ``None``."""
    configs = [d / "adapter_config.json" for d in directories]
    return common_value([read_json_object(c, what="adapter config").get("task_type") for c in configs if c.is_file()])


def merge_models(
    base: Ref,
    finetuned: Ref | Sequence[Ref],
    output_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    target: str | None = "global",
    residual: str = "ta",
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str | None = None,
    precision: str = "float64",
    export: str = "model",
    rank: int | None = None,
) -> MergeReport:
    """Merge full fine-tuned checkpoints of ``base`` by orthogonal-residual decoupling, streaming.

    Tensors are read, merged and written one at a time (the base's and each expert's copy of one
    tensor alive at once in the storage dtype, converted to the compute dtype one expert at a
    time where the method allows, plus one output shard), so memory stays near one checkpoint. Every 2-D
    floating tensor (embeddings and ``lm_head`` included; tied weights appear once in the file and
    are merged once) whose name matches ``include`` (default: all) and not ``exclude`` is
    decoupled; all other floating tensors (norms, biases, excluded matrices) are merged by
    ``residual`` on their task vectors; non-floating tensors are copied from the base. Weights of
    transformers' ``Conv1D`` modules (GPT-2 style, stored ``(in, out)``; found from the base's
    ``config.json`` by `layout.conv1d_weight_names`) are transposed for the math, so the rotation
    always acts on the input side.

    The output directory gets safetensors shards in the base dtype, the base's config and
    tokenizer files, ``README.md`` (model card) and ``orthomerge_report.json``; it loads with
    ``AutoModelForCausalLM.from_pretrained``. It is written atomically: on any error nothing is
    left behind, and inputs are never overwritten.

    Args:
        base: base model directory or Hub id.
        finetuned: fine-tuned checkpoints (directories or Hub ids) of the same architecture, and/or
            LoRA and OFT adapters of ``base`` (detected from their ``adapter_config.json``), each
            read as the checkpoint it makes of the base (PEFT's own fold, in float64;
            `sources.lora_checkpoint`, `sources.oft_checkpoint`); an OFT adapter also brings its
            exact rotation (below). Other adapter types are refused.
        output_dir: where to write (must not exist or be empty unless ``overwrite``).
        weights, target, residual, residual_kwargs, solver, precision: as in `merge_lora_adapters`
            (``precision="float32"`` also halves the memory of the math).
        include, exclude: regexes (``re.search``) over tensor names selecting what is decoupled.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``: where the math runs (in ``precision``). Under a
            launcher a bare ``"cuda"`` means ``cuda:<LOCAL_RANK>``.
        overwrite: replace a non-empty ``output_dir``.
        allow_pickle: read ``.bin`` checkpoints with ``torch.load(weights_only=True)``.
        max_shard_size: output shards are flushed at this size (bytes, or ``"500MB"``, ``"5GB"``);
            default: 1/16 of the base checkpoint, between 16 MiB and 5 GiB.
        export: ``"model"`` (default): the merged full model; ``"lora"``: instead of it, a PEFT
            LoRA adapter of ``base`` approximating the merge (below). The names and meaning are
            those of `merge_lora_adapters`.
        rank: the LoRA rank for ``export="lora"``.

    LoRA export (``export="lora"``). ``output_dir`` holds, instead of the full model, PEFT's
    ``"default"`` LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) with
    ``r = lora_alpha = rank`` (scaling 1): for every weight of a Linear, Embedding or ``Conv1D``
    module that the merge changes, ``B @ A`` (PEFT's layout: ``(out, in)`` for Linear; transposed
    for ``Conv1D``, stored ``(in, out)``, and Embedding, ``(vocab, hidden)``) is the rank-``rank``
    truncated SVD of ``merged - base`` in float64, stored in the base dtype promoted to at least
    float32. ``target_modules`` lists those modules by exact name (found by building the base's
    architecture on the meta device, `sources.layout.lora_weight_modules`); ``task_type`` is the
    one the adapter inputs agree on (else none), ``base_model_name_or_path`` is ``base``. Each
    merged tensor becomes its factors as it is produced and is dropped; the report records each
    truncation's relative Frobenius error (``params["lora_relative_errors"]``, and in the
    tensor's statistics). With ``rank`` at least the full rank, ``merge_and_unload()`` of the
    adapter gives the full merge to rounding. Refused (`ConfigError` naming the tensor, nothing
    written): a tensor the merge changes that no LoRA module can hold (a norm or bias a full
    fine-tune trained, an adapter's ``modules_to_save`` or biases, a weight tied to another
    module), since an adapter without it would silently not be the merged model; and a merge
    that changes no weight. Tensors merged to exactly the base value are left out.

    OFT experts. Per 2-D weight (decoupling ``W_i ~ W0 @ P_i``), an OFT adapter is never fitted by
    Procrustes, whatever the target: ``P_i = blockdiag(R)^T`` (``blockdiag(R)`` for an embedding,
    which PEFT rotates as ``E @ blockdiag(R)``), R the exact Cayley rotation of its stored blocks
    (for a Cayley-Neumann adapter, PEFT's default, the exact rotation its truncated series
    approximates), and ``rho_i`` = the weight it really applies (PEFT's fold with its own series) ``-
    W0 @ P_i``: zero for an exact-Cayley adapter, the truncation difference for a Neumann one. A
    weight it does not target is ``W0`` for it (``P_i = I``, ``rho_i = 0``). The generators
    (block-diagonal for OFT experts, dense for Procrustes ones) merge in so(in) with magnitude
    correction over the whole weight, the residuals with ``residual``; a weight any OFT expert
    rotates takes the dense driver (`ops.decouple.paths`). The conflict target's mean task vector
    counts every expert. OFT adapters alone: this is the so(in) merge of their block-diagonal
    generators, applied with the exact Cayley map and completed by the merged residuals, written
    as a full model. It differs from `merge_oft_checkpoints` (recipe ``kind: oft``), which merges
    the stored so(b) blocks in adapter space (its own methods, granularity, scale), writes an OFT
    adapter or folds with the output flag's map (the Neumann series for Neumann inputs) and
    ignores the truncation difference. For adapters of one block size with the exact Cayley
    map and ``residual="ta"`` both give the same folded model (``granularity="module"``,
    ``cayley="exact"``). Cost: one ``in x in`` solve per rotated weight, instead of ``out * in * b``.

    Several processes: started by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``),
    every process calls this function with the same arguments; the tensors are split between
    them by estimated cost (`peft_orthomerge.sinks.parallel.split_by_cost`), each writes its own
    shards into the shared temporary output directory (one file system for all nodes), and
    rank 0 writes the index, report and card. The tensors written do not depend on the number
    of processes; a rank that fails makes every rank raise its error, and nothing is written.

    Returns:
        The `MergeReport` (also written to ``orthomerge_report.json``), with per-tensor
        `ModuleStats` (``extra``: task vector, orthogonal part and residual norms per input).
    """
    refs = _refs(finetuned)
    weights_n = normalize_weights(weights, len(refs))
    options = DecoupleOptions(target, residual, residual_kwargs, solver, precision)
    _check_export(export, rank)
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    ctx = process_context(device)  # one process, or this rank of a torchrun / accelerate launch
    base_dir, base_reader = open_checkpoint(base, allow_pickle)
    opened = [open_expert(r, base_reader, base_dir, allow_pickle) for r in refs]
    readers = [r for _, r in opened]
    inputs = [base_dir, *[d for d, _ in opened]]
    check_output_dir(output_dir, inputs=inputs, overwrite=overwrite)
    validate_checkpoints(base_reader, readers)
    params = {"base": str(base), **options.params(), "include": include, "exclude": exclude}
    if export == "lora":  # the reports of full-model merges keep their keys
        params.update(export=export, rank=rank)
    report = MergeReport(
        kind="full",
        method=options.method_name,
        inputs=[str(r) for r in refs],
        weights=weights_n,
        output_path=str(Path(output_dir).expanduser().resolve()),
        params={**params, "device": str(ctx.device), "precision": precision},
    )
    rotated = rotated_tensors(readers)
    tasks = plan_checkpoint(base_reader, base_dir, options, include=inc, exclude=exc, rotated=rotated)
    jobs = CheckpointMerge(tasks, base_reader, readers, weights_n, options, ctx.device)
    if export == "lora":
        modules = lora_weight_modules(base_dir, base_reader.keys())
        spec = LoraExport(
            rank, modules, base_reader, ctx.device, base_model_ref(base), _adapter_task_type([d for d, _ in opened])
        )
        return write_lora_export(ctx, output_dir, jobs, report, spec, inputs=inputs, overwrite=overwrite)
    return write_checkpoint(
        ctx, output_dir, jobs, report, base_dir=base_dir, base_ref=str(base), inputs=inputs, overwrite=overwrite,
        max_shard_bytes=_shard_bytes(max_shard_size, base_reader.nbytes()),
    )  # fmt: skip
