"""Merging OFT modules in so(b), and folding them into base weights.

`merge_one` merges one planned module from every adapter's canonical skew vectors (internally a
skew block Q means ``R = (I+Q)(I-Q)^-1``; see `ops.skew`); `merged_rotation` is the ``(r, b, b)``
rotation PEFT builds from the merged vector under the output flag; `fold_module` applies it to a
base weight, ``W0 @ blockdiag(R)^T`` (``E @ blockdiag(R)`` for an embedding), block by block.
`FoldedOft` is the `sinks.checkpoint.TensorJobs` of a folded export: the base checkpoint's
tensors in order, each module folded, each pass-through tensor merged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch

from ..errors import IncompatibleInputsError, NumericalError
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


class CanonicalInputs:
    """Every adapter's canonical vectors of one module at a time, stacked ``(N, r, n)`` in one buffer
    reused from module to module (so reading allocates nothing once the largest module is seen).

    Row ``i`` holds adapter ``i``'s ``(r, n)`` vectors at the plan's block size: zeros where it does
    not target the module, a ``block_share`` single block repeated to ``r`` rows. The stack is in
    float64 if any of the module's inputs is stored in float64, else float32 (half precisions are
    widened). A stored tensor that is already canonical up to its sign is read straight into its
    row (`OftAdapter.read_canonical_into`); others (legacy, ``coft``, a smaller block size, another
    dtype) go through `adapter_canonical` and are copied in. The stack and its norms are valid until
    the next `read`: merge methods return new tensors, never views of it.
    """

    def __init__(self, plan: OftPlan) -> None:
        self.plan = plan
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def _stack(self, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1] * shape[2]
        flat = self.buffers.get(dtype)
        if flat is None or flat.numel() < numel:
            flat = self.buffers[dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)

    def read(self, mp: ModulePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``mp``'s stack ``(N, r, n)`` and its per-block norms (float64 ``(N, r)``, `block_norms`),
        on the plan's device; `NumericalError` naming the file and tensor if an input holds NaN / Inf."""
        plan = self.plan
        n = mp.b * (mp.b - 1) // 2
        stored = {a.tensors.dtype(src.key) for a, src in zip(plan.adapters, mp.sources) if src is not None}
        stack = self._stack((len(plan.adapters), mp.r, n), torch.float64 if torch.float64 in stored else torch.float32)
        converted = {}  # row -> norms of the inputs that went through adapter_canonical
        for i, (a, src) in enumerate(zip(plan.adapters, mp.sources)):
            if src is None:
                stack[i].zero_()
            elif not (src.b == mp.b and a.read_canonical_into(mp.name, stack[i])):
                vec, converted[i] = adapter_canonical(a, src, mp)
                stack[i].copy_(vec.expand(mp.r, n))
        stack = stack.to(plan.options.device)
        norms = block_norms(stack)
        for i, norm in converted.items():
            norms[i] = norm.to(norms.device)  # as computed in the input's own precision
        if not math.isfinite(float(norms.sum())):  # NaN / Inf anywhere make their block's norm non-finite
            i = int((~torch.isfinite(norms).all(dim=1)).nonzero()[0])
            key = mp.sources[i].key
            raise NumericalError(
                "tensor contains NaN or Inf values", path=plan.adapters[i].tensors.file_of(key), tensor=key
            )
        return stack, norms


def merge_one(plan: OftPlan, mp: ModulePlan, inputs: CanonicalInputs) -> ModuleMerge:
    """Merge module ``mp`` with the plan's method, its inputs read by ``inputs``."""
    stack, norms = inputs.read(mp)
    applied = [partial(peft_rotation, use_cayley_neumann=a.use_cayley_neumann, terms=a.terms) for a in plan.adapters]
    return merge_module(
        stack,
        plan.weights,
        method=plan.options.method,
        granularity=plan.options.granularity,
        scale=plan.options.scale,
        norms=norms,
        applied=applied,
    )


def iter_merged_modules(plan: OftPlan) -> Iterator[tuple[ModulePlan, ModuleMerge]]:
    """Merge the modules one at a time (only one module's tensors are in memory)."""
    inputs = CanonicalInputs(plan)
    for mp in plan.modules:
        yield mp, merge_one(plan, mp, inputs)


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
    plan: OftPlan, mp: ModulePlan, weight: torch.Tensor, probe: OrthogonalityProbe, inputs: CanonicalInputs
) -> tuple[torch.Tensor, ModuleStats]:
    """Fold module ``mp`` into ``weight``: the merged rotation (so(b) methods) or a Euclidean merge
    of the folded tasks; legacy ``oft_s`` output scales are merged as a weighted mean."""
    w0 = weight.to(plan.options.device)
    scales = [a.output_scale(mp.name) if s is not None else None for a, s in zip(plan.adapters, mp.sources)]
    if plan.options.euclidean:
        folded, stats = _fold_euclidean(plan, mp, w0, scales)
        return folded.to(weight.dtype), stats
    merge = merge_one(plan, mp, inputs)
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
        self.inputs = CanonicalInputs(plan)

    def items(self) -> list[tuple[str, float]]:
        return [(key, float(torch.Size(self.base.shape(key)).numel())) for key in self.base.keys()]

    def compute(self, key: str) -> tuple[torch.Tensor, ModuleStats | None]:
        tensor = self.base.get(key)
        if key in self.passthrough:
            tensor = merged_passthrough(self.plan, self.passthrough[key], base=tensor)
        if key not in self.modules:
            return tensor, None
        folded, stats = fold_module(self.plan, self.modules[key], tensor, self.probe, self.inputs)
        return folded.cpu(), stats

    def finish(self) -> None:
        self.probe.finish()
