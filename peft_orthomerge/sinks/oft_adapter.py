"""Sinks of an OFT merge: a PEFT adapter directory, or a folded full model (streamed tensor by tensor).

The merged adapter is an ordinary `OFTConfig` adapter: its ``use_cayley_neumann`` flag is the plan's
output convention (the stored vector is converted to it), ``coft`` is off so that PEFT never
alters the stored vector, and ``target_modules`` lists the merged modules by full name.

The orthogonality error in each module's `ModuleStats` is ``max_k ||R_k^T R_k - I||_F`` of the
rotation blocks PEFT builds under the output flag from the merged float32 vector (the stored one),
computed in float32 as PEFT's float32 forward does (float64 where float32 overflows), over the
``plan.orthogonality_blocks`` blocks of largest ``||Q_k||_F`` (default 4; ``None``: every block).
What it measures: with the exact Cayley flag, float32 rounding only (~1e-6); with the Neumann flag,
the series' truncation error (plus that rounding), a function of each block's rotation angles that
grows with them over the series' useful range (for the default 5 terms: angles below 1 rad), and
``||Q_k||_F`` bounds those angles, so the blocks of largest norm are the ones that show it (a
measurement on those blocks, not a proven maximum over the others).
``report.params["orthogonality_blocks"]`` records the setting. Non-orthogonal methods
(``mean_r``): every block of the mean rotation, in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import IncompatibleInputsError
from ..ops.oft_fold import fold_weight
from ..ops.orthogonality import max_orthogonality_error, orthogonality_errors
from ..ops.registry import get_euclidean
from ..ops.skew import from_canonical, peft_rotation, vec_to_skew
from ..plan.oft import ModulePlan, OftPlan, iter_merged_modules, merge_one, merged_passthrough
from ..progress import progress
from ..report import REPORT_FILE, MergeReport, ModuleStats
from ..sources.in_memory import ParameterShapes
from ..sources.oft import PREFIX
from ..sources.tensors import TensorReader
from .card import write_model_card
from .output import ShardedSafetensorsWriter, copy_base_side_files, finalize_shards

OFT_KEY = {"linear": "oft_R", "embedding": "oft_embedding_R"}


def new_report(plan: OftPlan, inputs: list[str], output_path: str | None) -> MergeReport:
    return MergeReport(
        kind="oft",
        method=plan.method,
        inputs=inputs,
        weights=plan.weights,
        output_path=output_path,
        params=plan.params,
        passthrough=sorted(plan.passthrough),
        warnings=list(plan.warnings),
    )


def merged_rotation(
    plan: OftPlan, mp: ModulePlan, vec: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The ``(r, b, b)`` rotation PEFT builds from the merged canonical ``vec`` under the output flag."""
    return peft_rotation(vec_to_skew(vec, mp.b, dtype=dtype), plan.use_cayley_neumann, plan.terms, dtype=dtype)


class _OrthogonalityProbe:
    """Fills in `ModuleStats.orthogonality_error` (see the module docstring) in batches: per module it
    keeps the float32 merged vectors of the ``plan.orthogonality_blocks`` blocks of largest norm, and
    builds their rotations together, a few thousand blocks at a time, in float32 (as PEFT's float32
    forward does); blocks where float32 overflows are redone in float64. A statistic that is still
    not finite is left ``None``, with a warning in the report."""

    FLUSH_BLOCKS = 4096

    def __init__(self, plan: OftPlan, report: MergeReport) -> None:
        self.plan = plan
        self.report = report
        self.pending: dict[int, list[tuple[ModuleStats, torch.Tensor]]] = {}
        self.count = 0

    def add(self, stats: ModuleStats, mp: ModulePlan, merge) -> ModuleStats:
        if merge.vec is None:  # non-orthogonal method: the rotation itself, every block
            self._set(stats, max_orthogonality_error(merge.rotation))
            return stats
        vec = merge.vec
        k = self.plan.orthogonality_blocks
        if k is not None and vec.shape[0] > k:
            vec = vec[torch.topk(merge.block_norms.to(vec.device), k).indices]
        self.pending.setdefault(mp.b, []).append((stats, vec.to(device="cpu", dtype=torch.float32)))
        self.count += vec.shape[0]
        if self.count >= self.FLUSH_BLOCKS:
            self.finish()
        return stats

    def _errors(self, vecs: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
        rotation = peft_rotation(
            vec_to_skew(vecs, b, dtype=dtype), self.plan.use_cayley_neumann, self.plan.terms, dtype=dtype
        )
        return orthogonality_errors(rotation)

    def _set(self, stats: ModuleStats, value: float) -> None:
        if math.isfinite(value):
            stats.orthogonality_error = value
        else:
            self.report.warnings.append(
                f"{stats.name}: the orthogonality error of the merged rotation is not finite (far outside the "
                "Neumann series' range); not reported"
            )

    def finish(self) -> None:
        for b, items in self.pending.items():
            vecs = torch.cat([v for _, v in items])
            errors = self._errors(vecs, b, torch.float32).double()
            bad = ~torch.isfinite(errors)
            if bool(bad.any()):
                errors[bad] = self._errors(vecs[bad], b, torch.float64)
            values, start = errors.tolist(), 0
            for stats, v in items:
                self._set(stats, max(values[start : start + v.shape[0]]))
                start += v.shape[0]
        self.pending, self.count = {}, 0


def _stats(mp: ModulePlan, merge) -> ModuleStats:
    """Per-module statistics; the orthogonality error is filled in by `_OrthogonalityProbe`."""
    return ModuleStats(
        name=mp.name,
        input_norms=merge.input_norms,
        merged_norm=merge.merged_norm,
        magnitude_factor=merge.magnitude_factor,
        extra=merge.extra,
    )


def _adapter_config(plan: OftPlan, base_model: str | None):
    from peft import OFTConfig

    first = plan.adapters[0].config
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
        base_model_name_or_path=base_model if base_model is not None else first.get("base_model_name_or_path"),
        task_type=first.get("task_type"),
    )


def write_adapter(
    plan: OftPlan, directory: str | Path, report: MergeReport, *, base_model: str | None = None
) -> MergeReport:
    """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` and the report JSON."""
    directory = Path(directory)
    writer = ShardedSafetensorsWriter(directory, prefix="adapter_model", max_shard_bytes=1 << 62)
    probe = _OrthogonalityProbe(plan, report)
    for mp, merge in progress(
        iter_merged_modules(plan), desc="merging OFT modules", total=len(plan.modules), unit="module"
    ):
        stored = from_canonical(merge.vec, plan.use_cayley_neumann)
        if plan.block_share:
            stored = stored[:1]
        writer.add(f"{PREFIX}{mp.name}.{OFT_KEY[mp.kind]}.weight", stored.to(torch.float32))
        report.modules.append(probe.add(_stats(mp, merge), mp, merge))
    probe.finish()
    for key in plan.passthrough:
        writer.add(key, merged_passthrough(plan, key))
    finalize_shards(directory, writer.close(), prefix="adapter_model")
    config = _adapter_config(plan, base_model)
    config.save_pretrained(str(directory))
    report.to_json(directory / REPORT_FILE)
    write_model_card(directory, report, base_model=config.base_model_name_or_path or None, library_name="peft")
    return report


def base_name(key: str) -> str:
    """Adapter pass-through key -> base checkpoint key (``base_model.model.`` and ``base_layer.`` removed)."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    return name.replace(".base_layer.", ".")


def check_fold_targets(plan: OftPlan, base: TensorReader | ParameterShapes) -> None:
    """Before writing: every module and pass-through tensor exists in the base with a fitting shape."""
    base_label = base.label if isinstance(base, ParameterShapes) else str(base.files[0].parent)
    for mp in plan.modules:
        key = f"{mp.name}.weight"
        label = next(a.label for a, s in zip(plan.adapters, mp.sources) if s is not None)
        if key not in base:
            raise IncompatibleInputsError(
                "OFT module not found in the base model", path=label, tensor=key, hint=f"Base: {base_label}"
            )
        shape = base.shape(key)
        in_dim = shape[1] if mp.kind == "embedding" else int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 0
        if len(shape) < 2 or in_dim % mp.b or (mp.r != 1 and mp.r * mp.b != in_dim):
            raise IncompatibleInputsError(
                f"{mp.r} OFT block(s) of size {mp.b} do not fit the base weight of shape {shape}",
                path=label,
                tensor=key,
                hint="The adapter was trained for a different base model.",
            )
    for key, holders in plan.passthrough.items():
        target = base_name(key)
        label = plan.adapters[holders[0]].label
        if target not in base:
            raise IncompatibleInputsError(
                f"tensor has no counterpart {target!r} in the base model", path=label, tensor=key
            )
        if base.shape(target) != plan.adapters[holders[0]].tensors.shape(key):
            raise IncompatibleInputsError(
                f"shape differs from the base tensor {target!r} {base.shape(target)}", path=label, tensor=key
            )


def _fold_module(
    plan: OftPlan, mp: ModulePlan, weight: torch.Tensor, report: MergeReport, probe: _OrthogonalityProbe
) -> torch.Tensor:
    """Fold module ``mp`` into ``weight``: merged rotation (so(b) methods) or a Euclidean merge of the folded tasks."""
    device = plan.device
    w0 = weight.to(device)
    scales = [a.output_scale(mp.name) if s is not None else None for a, s in zip(plan.adapters, mp.sources)]
    if plan.euclidean:
        taus = []
        for a, src, s in zip(plan.adapters, mp.sources, scales):
            if src is None:
                taus.append(torch.zeros_like(w0, dtype=torch.float32))
                continue
            rot = peft_rotation(vec_to_skew(a.canonical(mp.name).to(device), mp.b), a.use_cayley_neumann, a.terms)
            taus.append(fold_weight(w0, rot, mp.kind, out_scale=s, name=mp.name).float() - w0.float())
        gen = torch.Generator(device=device).manual_seed(0)
        merged = get_euclidean(plan.method)(taus, plan.weights, base=w0.float(), generator=gen)
        report.modules.append(ModuleStats(mp.name, [float(t.norm()) for t in taus], float(merged.norm())))
        return (w0.float() + merged.float()).to(weight.dtype)
    merge = merge_one(plan, mp)
    rotation = merge.rotation if merge.vec is None else merged_rotation(plan, mp, merge.vec)
    out_scale = None
    if any(s is not None for s in scales):
        out_scale = sum(w * (s if s is not None else 1.0) for w, s in zip(plan.weights, scales))
    report.modules.append(probe.add(_stats(mp, merge), mp, merge))
    return fold_weight(w0, rotation, mp.kind, out_scale=out_scale, name=mp.name)


def write_folded(
    plan: OftPlan, base: TensorReader, base_dir: Path, directory: str | Path, report: MergeReport, *, base_ref: str
) -> MergeReport:
    """Stream the base checkpoint tensor by tensor, fold the merged rotations, write shards + side files."""
    directory = Path(directory)
    modules = {f"{mp.name}.weight": mp for mp in plan.modules}
    passthrough = {base_name(k): k for k in plan.passthrough}
    writer = ShardedSafetensorsWriter(directory, prefix="model")
    probe = _OrthogonalityProbe(plan, report)
    for key in progress(base.keys(), desc="folding", unit="tensor"):
        tensor = base.get(key)
        if key in passthrough:
            tensor = merged_passthrough(plan, passthrough[key], base=tensor)
        if key in modules:
            tensor = _fold_module(plan, modules[key], tensor, report, probe).cpu()
        writer.add(key, tensor)
        del tensor
    probe.finish()
    finalize_shards(directory, writer.close(), prefix="model", total_bytes=writer.total_bytes)
    copy_base_side_files(base_dir, directory)
    report.to_json(directory / REPORT_FILE)
    write_model_card(directory, report, base_model=base_ref, library_name="transformers")
    return report
