"""Merging OFT modules in so(b), and folding them into base weights.

`merge_one` merges one planned module from every adapter's canonical skew vectors (internally a
skew block Q means ``R = (I+Q)(I-Q)^-1``; see `ops.skew`); `merged_rotation` is the ``(r, b, b)``
rotation PEFT builds from the merged vector under the output flag; `fold_module` applies it to a
base weight, ``W0 @ blockdiag(R)^T`` (``E @ blockdiag(R)`` for an embedding), block by block.
`FoldedOft` is the `sinks.checkpoint.TensorJobs` of a folded export: the base checkpoint's
tensors in order, each module folded, each pass-through tensor merged.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from ..errors import IncompatibleInputsError
from ..ops.block_lift import lift_blocks
from ..ops.oft_fold import fold_weight
from ..ops.registry import get_euclidean
from ..ops.skew import block_norms, peft_rotation, vec_to_skew
from ..ops.so_merge import ModuleMerge, merge_module
from ..plan.oft import ModulePlan, OftPlan
from ..report import MergeReport, ModuleStats
from ..sources.oft import OftAdapter, OftModule, base_name
from ..sources.tensors import TensorReader
from .oft_stats import OrthogonalityProbe, module_stats


def adapter_canonical(
    adapter: OftAdapter, src: OftModule, mp: ModulePlan, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's canonical ``(rows, n)`` vectors of module ``mp`` at the plan's block size
    (lifted exactly from a smaller one, `ops.block_lift`) and their per-block norms."""
    vec, norms = adapter.canonical_with_norms(mp.name, dtype=dtype)
    if src.b != mp.b:
        vec = lift_blocks(vec, src.b, mp.b)
        norms = block_norms(vec)
    return vec, norms


def canonical_inputs(plan: OftPlan, mp: ModulePlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each adapter's canonical ``(r, n)`` vectors for module ``mp`` in its stored precision
    (float32 / float64; zeros where not targeted; shared single blocks repeated to ``r`` rows),
    and their per-block norms (float64 ``(r,)``)."""
    n = mp.b * (mp.b - 1) // 2
    vecs, norms = [], []
    for a, src in zip(plan.adapters, mp.sources):
        if src is None:
            vecs.append(torch.zeros(mp.r, n, dtype=torch.float32, device=plan.options.device))
            norms.append(torch.zeros(mp.r, dtype=torch.float64, device=plan.options.device))
            continue
        vec, norm = adapter_canonical(a, src, mp)
        vec, norm = vec.to(plan.options.device), norm.to(plan.options.device)
        vecs.append(vec.expand(mp.r, n) if vec.shape[0] != mp.r else vec)
        norms.append(norm.expand(mp.r) if norm.shape[0] != mp.r else norm)
    return vecs, norms


def merge_one(plan: OftPlan, mp: ModulePlan) -> ModuleMerge:
    """Merge module ``mp`` with the plan's method."""
    vecs, norms = canonical_inputs(plan, mp)
    applied = [partial(peft_rotation, use_cayley_neumann=a.use_cayley_neumann, terms=a.terms) for a in plan.adapters]
    return merge_module(
        vecs,
        plan.weights,
        method=plan.options.method,
        granularity=plan.options.granularity,
        scale=plan.options.scale,
        norms=norms,
        applied=applied,
    )


def iter_merged_modules(plan: OftPlan) -> Iterator[tuple[ModulePlan, ModuleMerge]]:
    """Merge the modules one at a time (only one module's tensors are in memory)."""
    for mp in plan.modules:
        yield mp, merge_one(plan, mp)


def merged_passthrough(plan: OftPlan, key: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of a pass-through tensor; adapters without it contribute ``base``."""
    holders = plan.passthrough[key]
    total = None
    for i, (a, w) in enumerate(zip(plan.adapters, plan.weights)):
        value = a.tensors.get(key) if i in holders else base
        if value is None:
            raise IncompatibleInputsError("pass-through tensor missing and no base value", path=a.label, tensor=key)
        term = value.to(torch.float64) * w
        total = term if total is None else total + term
    dtype = plan.adapters[holders[0]].tensors.get(key).dtype if base is None else base.dtype
    return total.to(dtype)


def merged_rotation(
    plan: OftPlan, mp: ModulePlan, vec: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The ``(r, b, b)`` rotation PEFT builds from the merged canonical ``vec`` under the output flag."""
    return peft_rotation(vec_to_skew(vec, mp.b, dtype=dtype), plan.use_cayley_neumann, plan.terms, dtype=dtype)


def _fold_euclidean(plan: OftPlan, mp: ModulePlan, w0: torch.Tensor, scales: list) -> tuple[torch.Tensor, ModuleStats]:
    """A Euclidean baseline: the folded adapters' task vectors ``W_i - W0`` merged by the plan's method."""
    device = plan.options.device
    taus = []
    for a, src, s in zip(plan.adapters, mp.sources, scales):
        if src is None:
            taus.append(torch.zeros_like(w0, dtype=torch.float32))
            continue
        vec = adapter_canonical(a, src, mp, dtype=torch.float64)[0]
        rot = peft_rotation(vec_to_skew(vec.to(device), mp.b), a.use_cayley_neumann, a.terms)
        taus.append(fold_weight(w0, rot, mp.kind, out_scale=s, name=mp.name).float() - w0.float())
    gen = torch.Generator(device=device).manual_seed(0)
    merged = get_euclidean(plan.options.method)(taus, plan.weights, base=w0.float(), generator=gen)
    stats = ModuleStats(mp.name, [float(t.norm()) for t in taus], float(merged.norm()))
    return w0.float() + merged.float(), stats


def fold_module(
    plan: OftPlan, mp: ModulePlan, weight: torch.Tensor, probe: OrthogonalityProbe
) -> tuple[torch.Tensor, ModuleStats]:
    """Fold module ``mp`` into ``weight``: the merged rotation (so(b) methods) or a Euclidean merge
    of the folded tasks; legacy ``oft_s`` output scales are merged as a weighted mean."""
    w0 = weight.to(plan.options.device)
    scales = [a.output_scale(mp.name) if s is not None else None for a, s in zip(plan.adapters, mp.sources)]
    if plan.options.euclidean:
        folded, stats = _fold_euclidean(plan, mp, w0, scales)
        return folded.to(weight.dtype), stats
    merge = merge_one(plan, mp)
    rotation = merge.rotation if merge.vec is None else merged_rotation(plan, mp, merge.vec)
    out_scale = None
    if any(s is not None for s in scales):
        out_scale = sum(w * (s if s is not None else 1.0) for w, s in zip(plan.weights, scales))
    stats = probe.add(module_stats(mp, merge), mp, merge)
    return fold_weight(w0, rotation, mp.kind, out_scale=out_scale, name=mp.name), stats


class FoldedOft:
    """The folded model's tensors, computed on demand (`sinks.checkpoint.TensorJobs`): every base
    tensor in checkpoint order; planned modules folded, pass-through tensors merged, the rest copied."""

    def __init__(self, plan: OftPlan, base: TensorReader, report: MergeReport) -> None:
        self.plan, self.base = plan, base
        self.modules = {f"{mp.name}.weight": mp for mp in plan.modules}
        self.passthrough = {base_name(k): k for k in plan.passthrough}
        self.probe = OrthogonalityProbe(plan, report)

    def items(self) -> list[tuple[str, float]]:
        return [(key, float(torch.Size(self.base.shape(key)).numel())) for key in self.base.keys()]

    def compute(self, key: str) -> tuple[torch.Tensor, ModuleStats | None]:
        tensor = self.base.get(key)
        if key in self.passthrough:
            tensor = merged_passthrough(self.plan, self.passthrough[key], base=tensor)
        if key not in self.modules:
            return tensor, None
        folded, stats = fold_module(self.plan, self.modules[key], tensor, self.probe)
        return folded.cpu(), stats

    def finish(self) -> None:
        self.probe.finish()
