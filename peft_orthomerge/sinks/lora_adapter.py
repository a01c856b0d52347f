"""Merged weights as a LoRA adapter: the rank-``r`` truncated SVD of each merged delta.

The adapter is PEFT's ``"default"`` LoRA adapter (``lora_alpha = r``, so PEFT's scaling is 1)
on the base model, with ``B @ A`` in PEFT's layout: ``(out, in)`` for Linear, transposed for
``Conv1D`` (``fan_in_fan_out``, stored ``(in, out)``) and Embedding (``(vocab, hidden)``)
modules. The relative Frobenius error of each truncation is reported (`record_truncation`).

Two writers: `export_lora` injects the adapter into a model in memory (`merge_lora_adapters`);
`write_lora_export` streams a checkpoint merge (`merge_models`) into an adapter directory, one
merged tensor at a time: each delta lives only while its factors are computed, and only the
factors (the adapter itself, ``rank * (in + out)`` numbers per module) are kept until the file
is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, names_tensor
from ..memory import large_blocks_returned, release_free_memory
from ..ops.lapack import svd
from ..plan.lora import LoraTarget
from ..progress import progress
from ..report import MergeReport
from ..sources.tensors import TensorReader
from .card import write_report_files
from .checkpoint import Entry, TensorJobs, add_report_entries
from .parallel import ProcessContext, distributed_output, split_by_cost

PEFT_PREFIX = "base_model.model."
# PEFT's saved names of the two factors, per module kind (`sources.layout.lora_weight_modules`)
FACTOR_KEYS = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "conv1d": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``
    (zero-padded to ``rank`` when the matrix is smaller)."""
    u, s, vh = svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    total = float(torch.linalg.vector_norm(s))
    err = float(torch.linalg.vector_norm(s[k:])) / total if total > 0 else 0.0
    return a, b, err


def _copy_factors(peft_model: Any, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    layer = peft_model.base_model.model.get_submodule(key)
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        layer.lora_embedding_A["default"].data.copy_(a.to(layer.lora_embedding_A["default"].dtype))
        layer.lora_embedding_B["default"].data.copy_(b.to(layer.lora_embedding_B["default"].dtype))
    else:
        layer.lora_A["default"].weight.data.copy_(a.to(layer.lora_A["default"].weight.dtype))
        layer.lora_B["default"].weight.data.copy_(b.to(layer.lora_B["default"].weight.dtype))


def export_lora(
    base: Any, plan: dict[str, LoraTarget], merged: dict[str, torch.Tensor], rank: int, report: MergeReport
) -> Any:
    """A `PeftModel` on ``base`` whose adapter approximates each merged weight (module doc)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(plan), lora_dropout=0.0, init_lora_weights=True)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for key, target in plan.items():
        delta = merged[key] - target.module.weight.detach().to(torch.float64)
        is_embedding = isinstance(target.module, torch.nn.Embedding)
        mat = delta.T if (target.fan_in_fan_out or is_embedding) else delta  # B @ A in PEFT's layout
        a, b, errors[f"{key}.weight"] = truncated_factors(mat, rank)
        factors[key] = (a, b)
    peft_model = get_peft_model(base, config)
    for key, (a, b) in factors.items():
        _copy_factors(peft_model, key, a, b)
    record_truncation(report, rank, errors)
    return peft_model


def record_truncation(report: MergeReport, rank: int, errors: dict[str, float]) -> None:
    """Record each truncation's relative Frobenius error ``||delta - B @ A|| / ||delta||`` (by tensor
    name: in the tensor's `ModuleStats` ``extra`` when it has one, and in
    ``params["lora_relative_errors"]``), the largest, and a warning saying so."""
    stats = {s.name: s for s in report.modules}
    for name, err in errors.items():
        if name in stats:
            stats[name].extra["lora_relative_error"] = err
    worst = max(errors.values(), default=0.0)
    report.params["lora_relative_errors"] = dict(errors)
    report.params["lora_max_relative_error"] = worst
    report.warnings.append(
        f"export='lora': rank-{rank} truncated SVD of the merged deltas; max relative Frobenius error {worst:.3e}"
    )


def peft_layout(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """A stored weight's delta as PEFT's ``B @ A``: ``(out, in)`` for ``"linear"``; a ``"conv1d"``
    weight (stored ``(in, out)``) and an ``"embedding"`` (``(vocab, hidden)``) transposed."""
    return delta if kind == "linear" else delta.T


@dataclass(frozen=True)
class LoraExport:
    """What `write_lora_export` needs besides the merged tensors.

    Attributes:
        rank: the adapter's rank (``lora_alpha = rank``: PEFT's scaling is 1).
        modules: checkpoint tensor name -> ``(module name, kind)`` of every weight the adapter can
            hold (`sources.layout.lora_weight_modules`).
        base: the base checkpoint (each delta is ``merged - base``, in float64).
        device: where the SVDs run.
        base_model: the adapter's ``base_model_name_or_path``.
        task_type: the adapter's ``task_type`` (``None``: a plain `PeftModel`).
    """

    rank: int
    modules: dict[str, tuple[str, str]]
    base: TensorReader
    device: torch.device
    base_model: str | None
    task_type: str | None


@names_tensor
def export_factors(
    name: str, merged: torch.Tensor, export: LoraExport
) -> tuple[dict[str, torch.Tensor], float] | None:
    """PEFT's two factor tensors of merged tensor ``name`` and the relative truncation error, or
    ``None`` when it equals the base (nothing to store).

    The factors are stored in the base dtype promoted to at least float32 (float64 stays float64).

    Raises:
        ConfigError: ``name`` changed but no LoRA module can hold it (a norm, a bias, a tensor of
            ``modules_to_save``, a tied weight): an adapter without it would silently not be the merge.
    """
    w0 = export.base.get(name)
    if name not in export.modules:
        if torch.equal(merged, w0):
            return None
        raise ConfigError(
            "the merge changes this tensor, which is not the weight of a Linear, Embedding or Conv1D "
            "module a LoRA adapter can adapt (a norm, a bias, a modules_to_save or tied tensor)",
            tensor=name,
            hint="Use export='model' (output.format: model): a LoRA adapter without it would not be the merged model.",
        )
    delta = merged.to(export.device, torch.float64) - w0.to(export.device, torch.float64)
    if not bool(delta.any()):
        return None
    module, kind = export.modules[name]
    a, b, err = truncated_factors(peft_layout(delta, kind), export.rank)
    dtype = torch.promote_types(w0.dtype, torch.float32)
    key_a, key_b = FACTOR_KEYS[kind]
    prefix = f"{PEFT_PREFIX}{module}."
    return {prefix + key_a: a.to("cpu", dtype), prefix + key_b: b.to("cpu", dtype)}, err


def lora_adapter_config(export: LoraExport, targets: Iterable[tuple[str, str]]) -> Any:
    """PEFT's `LoraConfig` of the exported adapter: ``target_modules`` the exact module names of
    ``targets`` (``(module, kind)``), ``fan_in_fan_out`` set when they are ``Conv1D`` modules (PEFT
    resets it per module for the others)."""
    from peft import LoraConfig

    targets = list(targets)
    return LoraConfig(
        r=export.rank,
        lora_alpha=export.rank,
        target_modules=sorted(module for module, _ in targets),
        fan_in_fan_out=any(kind == "conv1d" for _, kind in targets),
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
        base_model_name_or_path=export.base_model,
        task_type=export.task_type,
    )


def write_lora_export(
    ctx: ProcessContext,
    output_dir: str | os.PathLike,
    jobs: TensorJobs,
    report: MergeReport,
    export: LoraExport,
    *,
    inputs: Iterable[str | os.PathLike],
    overwrite: bool = False,
    desc: str = "merging",
) -> MergeReport:
    """Compute ``jobs`` (this rank's share) and write their deltas as a PEFT LoRA adapter directory.

    ``output_dir`` appears atomically with ``adapter_config.json`` (`lora_adapter_config`, saved by
    PEFT), ``adapter_model.safetensors`` (PEFT's key names: ``base_model.model.<module>.lora_A.weight``
    / ``lora_B.weight``, ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), ``README.md``
    and ``orthomerge_report.json`` with the truncation errors (`record_truncation`); on any error,
    on any rank, nothing is left behind. Each merged tensor is turned into its factors as it is
    produced (`export_factors`) and dropped; the ranks' factors are gathered and written by rank 0.

    Raises:
        ConfigError: a changed tensor no LoRA module can hold (`export_factors`), or a merge that
            changes no weight at all (the adapter would be empty).
    """
    items = jobs.items()
    mine = split_by_cost(items, ctx.world_size)[ctx.rank]
    Part = tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Entry]]

    def work(tmp: Path) -> Part:
        factors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        done: dict[str, Entry] = {}
        with torch.no_grad():
            for name in progress(mine, desc=desc, unit="tensor"):
                merged, done[name] = jobs.compute(name)
                exported = export_factors(name, merged, export)
                del merged
                if exported is not None:
                    tensors, errors[name] = exported
                    factors.update(tensors)
                release_free_memory()
            jobs.finish()
        return factors, errors, done

    def finalize(tmp: Path, parts: list[Part]) -> MergeReport:
        factors = {k: v for part in parts for k, v in part[0].items()}
        found = {k: v for part in parts for k, v in part[1].items()}
        if not factors:
            raise ConfigError(
                "the merge changes no weight: the LoRA adapter would be empty", hint="Use export='model'."
            )
        order = [name for name, _ in items]
        add_report_entries(report, order, {k: v for part in parts for k, v in part[2].items()})
        errors = {name: found[name] for name in order if name in found}
        record_truncation(report, export.rank, errors)
        save_file(factors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_adapter_config(export, (export.modules[name] for name in errors)).save_pretrained(str(tmp))
        write_report_files(tmp, report, base_model=export.base_model, library_name="peft")
        return report

    with large_blocks_returned():
        return distributed_output(
            ctx, output_dir, work=work, finalize=finalize, inputs=list(inputs), overwrite=overwrite
        )
