"""The merge plan: every check on the inputs and options, done before any tensor is merged or written.

A plan fixes the output convention (``use_cayley_neumann`` and the number of Neumann terms),
the union of target modules (a module an adapter does not target is the identity for it), and
which tensors are merged how. `iter_merged_modules` then streams the merge one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from ..device import resolve_device
from ..errors import ConfigError, IncompatibleInputsError
from ..ops.registry import euclidean_methods
from ..ops.skew import peft_rotation
from ..ops.so_merge import ModuleMerge, get_so_method, merge_module, so_methods
from ..ops.weights import normalize_weights
from ..sources.oft import OftAdapter, OftModule

CAYLEY_CHOICES = ("auto", "exact", "neumann")
ORTHOGONALITY_BLOCKS = 4  # default: blocks per module whose orthogonality error is measured (see writer)
EXPORTS = ("adapter", "memory", "folded")


@dataclass
class ModulePlan:
    """One output module: its kind, block size, stored rows, and each adapter's source (or ``None``)."""

    name: str
    kind: str
    b: int
    r: int
    sources: list[OftModule | None]


@dataclass
class OftPlan:
    adapters: list[OftAdapter]
    weights: list[float]
    method: str
    granularity: str
    scale: float
    export: str
    euclidean: bool
    use_cayley_neumann: bool
    terms: int
    block_share: bool
    oft_block_size: int  # the output OFTConfig's oft_block_size and r (one of them is 0)
    oft_rank: int
    modules: list[ModulePlan]
    passthrough: dict[str, list[int]]  # key -> indices of the adapters holding it
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    orthogonality_blocks: int | None = ORTHOGONALITY_BLOCKS  # None: every block

    @property
    def params(self) -> dict:
        return {
            "granularity": self.granularity,
            "scale": self.scale,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.terms,
            "export": self.export,
            "orthogonality_blocks": "all" if self.orthogonality_blocks is None else self.orthogonality_blocks,
        }


def _choose_method(method: str, export: str) -> bool:
    """Return True for a Euclidean baseline method; raise `ConfigError` for unknown / unexportable ones."""
    if method in so_methods():
        if not get_so_method(method).orthogonal and export != "folded":
            raise ConfigError(
                f"method {method!r} does not produce a rotation, so it cannot be stored as an OFT adapter",
                hint="Use it with fold_into=<base model> (folded export), or choose 'orthomerge', 'mean_q' or 'product_r'.",
            )
        return False
    if method in euclidean_methods():
        if export != "folded":
            raise ConfigError(
                f"Euclidean method {method!r} acts on folded weights and cannot give an OFT adapter",
                hint="Pass fold_into=<base model> to merge_oft_checkpoints.",
            )
        return True
    valid = ", ".join([*so_methods(), *euclidean_methods()])
    raise ConfigError(f"unknown method {method!r}; valid: {valid}")


def build_plan(
    adapters: Sequence[OftAdapter],
    weights: Sequence[float] | None,
    *,
    method: str = "orthomerge",
    granularity: str = "module",
    cayley: str = "auto",
    scale: float = 1.0,
    export: str = "adapter",
    device: str = "cpu",
    orthogonality_blocks: int | None = ORTHOGONALITY_BLOCKS,
) -> OftPlan:
    """Validate everything about a merge of ``adapters`` and return the plan.

    ``orthogonality_blocks``: per module, the number of merged blocks (those of largest norm) whose
    orthogonality error the report measures; ``None`` measures every block.
    """
    if not adapters:
        raise ConfigError("no adapters to merge", hint="Pass at least one OFT adapter.")
    weights = normalize_weights(weights, len(adapters))
    euclidean = _choose_method(method, export)
    if granularity not in ("module", "block"):
        raise ConfigError(f"unknown granularity {granularity!r}; valid: 'module', 'block'")
    if cayley not in CAYLEY_CHOICES:
        raise ConfigError(f"unknown cayley option {cayley!r}; valid: {', '.join(CAYLEY_CHOICES)}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale must be a number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise ConfigError(f"scale must be finite, got {scale}")
    if orthogonality_blocks is not None and (
        isinstance(orthogonality_blocks, bool) or not isinstance(orthogonality_blocks, int) or orthogonality_blocks < 1
    ):
        raise ConfigError(
            f"orthogonality_blocks must be a positive integer or None (every block), got {orthogonality_blocks!r}"
        )
    device = str(resolve_device(device))  # "auto" -> cuda:N or cpu; ConfigError when CUDA is missing
    warnings = [w for a in adapters for w in a.warnings]
    for a in adapters:
        if a.fold_only_reason and export != "folded":
            raise IncompatibleInputsError(
                a.fold_only_reason, path=a.label, hint="It can only be folded: pass fold_into=<base model>."
            )

    flags = {a.use_cayley_neumann for a in adapters}
    if cayley == "exact":
        use_neumann = False
    elif cayley == "neumann":
        use_neumann = True
    elif len(flags) == 1:
        use_neumann = flags.pop()
    else:
        use_neumann = False
        warnings.append(
            "inputs mix use_cayley_neumann=True and False; they were brought to one convention and the merged "
            "adapter uses the exact Cayley map (use_cayley_neumann=False)"
        )
    term_set = sorted({a.terms for a in adapters if a.use_cayley_neumann})
    terms = term_set[-1] if term_set else 5
    if len(term_set) > 1:
        warnings.append(f"inputs use different num_cayley_neumann_terms {term_set}; the output uses {terms}")

    modules = _plan_modules(adapters, export)
    block_share = all(a.block_share for a in adapters)
    sizes = {m.b for m in modules}
    configured = {int(a.config.get("oft_block_size") or 0) for a in adapters}
    ranks = {int(a.config.get("r") or 0) for a in adapters}
    oft_rank = 0
    if len(sizes) == 1:
        oft_block_size = sizes.pop()
    elif len(configured) == 1 and 0 not in configured:
        oft_block_size = configured.pop()  # PEFT adjusts it per module the same way on reload
    elif len(ranks) == 1 and 0 not in ranks and len({m.r for m in modules}) == 1:
        oft_block_size, oft_rank = 0, ranks.pop()  # configured by the number of blocks
    else:
        raise IncompatibleInputsError(
            f"modules use different block sizes {sorted(sizes)} and the adapters were configured with different "
            f"oft_block_size {sorted(configured)}: one OFT config cannot describe the result"
        )
    passthrough: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        for key in a.passthrough:
            passthrough.setdefault(key, []).append(i)
    for key, holders in passthrough.items():
        shapes = {adapters[i].tensors.shape(key) for i in holders}
        if len(shapes) > 1:
            raise IncompatibleInputsError(
                f"pass-through tensor has different shapes {sorted(shapes)}",
                path=adapters[holders[0]].label,
                tensor=key,
            )
        if len(holders) < len(adapters) and export != "folded":
            missing = adapters[next(i for i in range(len(adapters)) if i not in holders)]
            raise IncompatibleInputsError(
                "pass-through tensor (bias / modules_to_save) is missing from some adapters, so its merge needs the base value",
                path=missing.label,
                tensor=key,
                hint="Fold into the base model (fold_into=...), or merge adapters saved with the same bias / modules_to_save settings.",
            )
    return OftPlan(
        list(adapters),
        weights,
        method,
        granularity,
        scale,
        export,
        euclidean,
        use_neumann,
        terms,
        block_share,
        oft_block_size,
        oft_rank,
        modules,
        passthrough,
        warnings,
        device,
        orthogonality_blocks,
    )


def _plan_modules(adapters: Sequence[OftAdapter], export: str) -> list[ModulePlan]:
    names: dict[str, None] = {}
    for a in adapters:
        names.update(dict.fromkeys(a.modules))
    plans = []
    for name in names:
        sources = [a.modules.get(name) for a in adapters]
        present = [(a, m) for a, m in zip(adapters, sources) if m is not None]
        a0, m0 = present[0]
        for a, m in present[1:]:
            if m.kind != m0.kind:
                raise IncompatibleInputsError(
                    f"module is an {m0.kind} in {a0.label} but an {m.kind} here", path=a.label, tensor=m.key
                )
            if m.b != m0.b:
                raise IncompatibleInputsError(
                    f"block size {m.b} differs from {m0.b} in {a0.label}", path=a.label, tensor=m.key
                )
        rows = {m.r for _, m in present}
        full = rows - {1}
        if len(full) > 1:
            a, m = next((a, m) for a, m in present if m.r != m0.r)
            raise IncompatibleInputsError(
                f"{m.r} blocks here but {m0.r} in {a0.label}: the module shapes differ", path=a.label, tensor=m.key
            )
        r = full.pop() if full else 1
        shared_here = any(a.block_share for a, _ in present)
        if r == 1 and shared_here and not all(a.block_share for a in adapters) and export != "folded":
            a, m = next((a, m) for a, m in present if a.block_share)
            raise IncompatibleInputsError(
                "block_share adapter mixed with non-shared adapters, and no adapter tells how many blocks this module has",
                path=a.label,
                tensor=m.key,
                hint="Fold into the base model (fold_into=...) or merge adapters with the same block_share setting.",
            )
        plans.append(ModulePlan(name, m0.kind, m0.b, r, sources))
    return plans


def canonical_inputs(plan: OftPlan, mp: ModulePlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each adapter's canonical ``(r, n)`` vectors for module ``mp`` in its stored precision
    (float32 / float64; zeros where not targeted; shared single blocks repeated to ``r`` rows),
    and their per-block norms (float64 ``(r,)``)."""
    n = mp.b * (mp.b - 1) // 2
    vecs, norms = [], []
    for a, src in zip(plan.adapters, mp.sources):
        if src is None:
            vecs.append(torch.zeros(mp.r, n, dtype=torch.float32, device=plan.device))
            norms.append(torch.zeros(mp.r, dtype=torch.float64, device=plan.device))
            continue
        vec, norm = a.canonical_with_norms(mp.name)
        vec, norm = vec.to(plan.device), norm.to(plan.device)
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
        method=plan.method,
        granularity=plan.granularity,
        scale=plan.scale,
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
