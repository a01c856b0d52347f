"""Merging OFT modules in so(b), and folding them into base weights.

`merge_one` merges one planned module from every adapter's canonical skew vectors (internally a
skew block Q means ``R = (I+Q)(I-Q)^-1``; see `ops.skew`); `merged_rotation` is the ``(r, b, b)``
rotation PEFT builds from the merged vector under the output flag; `fold_module` applies it to a
base weight, ``W0 @ blockdiag(R)^T`` (``E @ blockdiag(R)`` for an embedding), block by block.
`FoldedOft` is the `sinks.checkpoint.TensorJobs` of a folded export: the base checkpoint's
tensors in order, each module folded, each pass-through tensor merged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from ..errors import IncompatibleInputsError, NumericalError, tensor_named
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


GROUP_BYTES = 16 * 2**20  # stacked input bytes of the consecutive modules read together


@dataclass
class _ReadRows:
    """One module's stack as `CanonicalInputs` filled it from the files: rows in ``negated`` hold the
    stored vectors of an exact-Cayley adapter (to be negated); rows in ``other`` are not filled yet
    (no source: zeros; another layout: `adapter_canonical`)."""

    mp: ModulePlan
    stack: torch.Tensor
    negated: list[int] = field(default_factory=list)
    other: list[int] = field(default_factory=list)


class CanonicalInputs:
    """Every adapter's canonical vectors of one module at a time, stacked ``(N, r, n)`` in buffers
    reused from module to module (so reading allocates nothing once the largest group is seen).

    Row ``i`` holds adapter ``i``'s ``(r, n)`` vectors at the plan's block size: zeros where it does
    not target the module, a ``block_share`` single block repeated to ``r`` rows. The stack is in
    float64 if any of the module's inputs is stored in float64, else float32 (half precisions are
    widened). A stored tensor that is already canonical up to its sign is read straight into its
    row (`OftAdapter.stored_canonical_key`) and negated in place where the adapter stores it
    negated; others (legacy, ``coft``, a smaller block size, another dtype) go through
    `adapter_canonical` and are copied in.

    `prefetched` reads consecutive modules in groups of about `GROUP_BYTES` of stacks, one vectored
    read per input file and group (`TensorReader.read_plan`), the next group's file reads running
    in a background thread while the caller merges this one. The caller's thread plans the reads
    (buffers, offsets, checks); that thread only performs them (which releases the GIL), and every
    computation runs in the caller's thread, so results do not depend on it. A stack is valid until
    the group after the next one is read: merge methods return new tensors, never views of it.
    `read` reads one module, in the caller's thread.
    """

    def __init__(self, plan: OftPlan) -> None:
        self.plan = plan
        self.device = torch.device(plan.options.device)
        self.buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}  # (dtype, slot) -> flat buffer

    def _dtype(self, mp: ModulePlan) -> torch.dtype:
        stored = {a.tensors.dtype(src.key) for a, src in zip(self.plan.adapters, mp.sources) if src is not None}
        return torch.float64 if torch.float64 in stored else torch.float32

    def _shape(self, mp: ModulePlan) -> tuple[int, int, int]:
        return len(self.plan.adapters), mp.r, mp.b * (mp.b - 1) // 2

    def _groups(self, modules: Sequence[ModulePlan]) -> list[list[tuple[ModulePlan, torch.dtype]]]:
        """Consecutive modules, each with its stack's dtype, in groups of at most `GROUP_BYTES` of
        stacks (a larger module alone)."""
        groups: list[list[tuple[ModulePlan, torch.dtype]]] = []
        size = GROUP_BYTES
        for mp in modules:
            dtype = self._dtype(mp)
            nbytes = math.prod(self._shape(mp)) * dtype.itemsize
            if size + nbytes > GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((mp, dtype))
            size += nbytes
        return groups

    def _plan(
        self, group: Sequence[tuple[ModulePlan, torch.dtype]], slot: int
    ) -> tuple[list[_ReadRows], list[Callable[[], None]]]:
        """The stacks of ``group``'s modules in buffer ``slot``, and the file reads that fill their
        directly readable rows (one `read_plan` per adapter), not yet run."""
        plan = self.plan
        used: dict[torch.dtype, int] = {}
        for mp, dtype in group:
            used[dtype] = used.get(dtype, 0) + math.prod(self._shape(mp))
        for dtype, numel in used.items():
            flat = self.buffers.get((dtype, slot))
            if flat is None or flat.numel() < numel:
                self.buffers[(dtype, slot)] = torch.empty(numel, dtype=dtype)
        stacks, offsets = [], dict.fromkeys(used, 0)
        for mp, dtype in group:
            shape, start = self._shape(mp), offsets[dtype]
            offsets[dtype] += math.prod(shape)
            stacks.append(_ReadRows(mp, self.buffers[(dtype, slot)][start : offsets[dtype]].view(shape)))
        reads = []
        for i, a in enumerate(plan.adapters):
            direct = []
            for rows in stacks:
                mp, row = rows.mp, rows.stack[i]
                src = mp.sources[i]
                key = None if src is None or src.b != mp.b else a.stored_canonical_key(mp.name, row.shape, row.dtype)
                if key is None:
                    rows.other.append(i)
                    continue
                direct.append((key, row))
                if a.stores_negated:
                    rows.negated.append(i)
            reads += a.tensors.read_plan(direct)
        return stacks, reads

    def _finish(self, rows: _ReadRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete a filled stack (signs, zeros, converted rows), move it to the plan's device and
        check it: the stack and its per-block norms (float64 ``(N, r)``, `block_norms`)."""
        plan, mp, stack = self.plan, rows.mp, rows.stack
        for i in rows.negated:
            stack[i].neg_()
        converted = {}  # row -> norms of the inputs that went through adapter_canonical
        for i in rows.other:
            a, src = plan.adapters[i], mp.sources[i]
            if src is None:
                stack[i].zero_()
            else:
                vec, converted[i] = adapter_canonical(a, src, mp)
                stack[i].copy_(vec.expand(mp.r, stack.shape[-1]))
        stack = stack.to(self.device)
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

    def read(self, mp: ModulePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``mp``'s stack ``(N, r, n)`` and its per-block norms (float64 ``(N, r)``, `block_norms`),
        on the plan's device; `NumericalError` naming the file and tensor if an input holds NaN / Inf."""
        stacks, reads = self._plan([(mp, self._dtype(mp))], 0)
        _run(reads)
        return self._finish(stacks[0])

    def prefetched(
        self, modules: Sequence[ModulePlan]
    ) -> Iterator[tuple[ModulePlan, tuple[torch.Tensor, torch.Tensor]]]:
        """`read` of each module in turn, by groups, each group read while the one before is merged:
        by a background thread when every input is read from files, else in this thread, up front."""
        groups = self._groups(modules)
        threaded = len(groups) > 1 and all(a.tensors.positional for a in self.plan.adapters)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthomerge-read") if threaded else None
        with pool or contextlib.nullcontext():

            def start(k: int) -> tuple[list[_ReadRows], Future | None]:
                stacks, reads = self._plan(groups[k], k % 2)
                if pool is not None:
                    return stacks, pool.submit(_run, reads)
                _run(reads)
                return stacks, None

            ahead = start(0)
            for k in range(len(groups)):
                stacks, reading = ahead
                if reading is not None:
                    reading.result()
                if k + 1 < len(groups):
                    ahead = start(k + 1)
                for rows in stacks:
                    yield rows.mp, self._finish(rows)


def _run(reads: Sequence[Callable[[], None]]) -> None:
    for read in reads:
        read()


def merge_one(plan: OftPlan, mp: ModulePlan, inputs: CanonicalInputs) -> ModuleMerge:
    """Merge module ``mp`` with the plan's method, its inputs read by ``inputs``."""
    return merge_read(plan, mp, *inputs.read(mp))


def merge_read(plan: OftPlan, mp: ModulePlan, stack: torch.Tensor, norms: torch.Tensor) -> ModuleMerge:
    """Merge module ``mp``'s stack ``(N, r, n)`` with its per-block norms by the plan's method; an
    error of the math (an inverse Cayley map undefined at a block, ...) names the module."""
    applied = [partial(peft_rotation, use_cayley_neumann=a.use_cayley_neumann, terms=a.terms) for a in plan.adapters]
    with tensor_named(mp.name):
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
    """Merge the modules one at a time, reading them by groups (`CanonicalInputs.prefetched`: at most
    two groups' inputs in memory, the one being merged and the next one being read)."""
    for mp, (stack, norms) in CanonicalInputs(plan).prefetched(plan.modules):
        yield mp, merge_read(plan, mp, stack, norms)


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
