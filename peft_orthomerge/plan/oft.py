"""The plan of an OFT merge: every check on the inputs and options, done before any tensor is merged.

A plan fixes the output convention (``use_cayley_neumann`` and the number of Neumann terms), the
union of target modules (a module an adapter does not target is the identity for it), the output
block configuration, and the pass-through tensors (biases, ``modules_to_save``) and who holds
them. `check_fold_targets` checks a plan against the base model it will be folded into or
loaded onto. The merge itself is `merge.oft`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, IncompatibleInputsError
from ..ops.block_lift import common_block_size
from ..ops.weights import normalize_weights
from ..sources.in_memory import ParameterShapes
from ..sources.oft import OftAdapter, OftModule, base_name
from ..sources.tensors import TensorReader
from .options import OftOptions


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
    """A validated OFT merge. ``oft_block_size`` / ``oft_rank``: the output `OFTConfig`'s
    ``oft_block_size`` and ``r`` (one of them is 0); ``passthrough``: key -> indices of the
    adapters holding it."""

    adapters: list[OftAdapter]
    weights: list[float]
    options: OftOptions
    use_cayley_neumann: bool
    terms: int
    block_share: bool
    oft_block_size: int
    oft_rank: int
    modules: list[ModulePlan]
    passthrough: dict[str, list[int]]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict:
        """The plan's settings as a report records them."""
        blocks = self.options.orthogonality_blocks
        return {
            "granularity": self.options.granularity,
            "scale": self.options.scale,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.terms,
            "export": self.options.export,
            "orthogonality_blocks": "all" if blocks is None else blocks,
        }


def _output_convention(adapters: Sequence[OftAdapter], cayley: str, warnings: list[str]) -> tuple[bool, int]:
    """The merged adapter's ``use_cayley_neumann`` and ``num_cayley_neumann_terms``."""
    flags = {a.use_cayley_neumann for a in adapters}
    if cayley in ("exact", "neumann"):
        use_neumann = cayley == "neumann"
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
    return use_neumann, terms


def _output_blocks(adapters: Sequence[OftAdapter], modules: Sequence[ModulePlan]) -> tuple[int, int]:
    """``(oft_block_size, r)`` of the output config: one block size, or the inputs' common setting."""
    sizes = {m.b for m in modules}
    configured = {int(a.config.get("oft_block_size") or 0) for a in adapters}
    ranks = {int(a.config.get("r") or 0) for a in adapters}
    if len(sizes) == 1:
        return sizes.pop(), 0
    if len(configured) == 1 and 0 not in configured:
        return configured.pop(), 0  # PEFT adjusts it per module the same way on reload
    if len(ranks) == 1 and 0 not in ranks and len({m.r for m in modules}) == 1:
        return 0, ranks.pop()  # configured by the number of blocks
    raise IncompatibleInputsError(
        f"modules use different block sizes {sorted(sizes)} and the adapters were configured with different "
        f"oft_block_size {sorted(configured)}: one OFT config cannot describe the result",
        hint="Fold the merge into the base model instead (fold_into=<base model>, or output format: folded).",
    )


def _plan_passthrough(adapters: Sequence[OftAdapter], export: str) -> dict[str, list[int]]:
    """Pass-through key -> indices of the adapters that hold it; shapes must agree, and outside a
    folded export every adapter must hold it (its merge would need the base value)."""
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
    return passthrough


def _form_notes(adapters: Sequence[OftAdapter], export: str) -> list[str]:
    """How a merged adapter differs in form from its inputs (what it computes is unchanged)."""
    if export == "folded":
        return []
    notes = []
    stored = sorted({str(a.tensors.dtype(m.key)).removeprefix("torch.") for a in adapters for m in a.modules.values()})
    if stored != ["float32"]:
        notes.append(
            f"the inputs store their OFT tensors as {', '.join(stored)}; the merged adapter stores float32 "
            "(PEFT computes its rotations in float32)"
        )
    if any(a.config.get("coft") for a in adapters):
        notes.append(
            "inputs with coft=True were read with PEFT's projection applied; the merged adapter stores the "
            "projected generator and is written with coft=False, so PEFT applies it unchanged"
        )
    return notes


def build_plan(adapters: Sequence[OftAdapter], weights: Sequence[float] | None, options: OftOptions) -> OftPlan:
    """Validate everything about a merge of ``adapters`` under ``options`` and return the plan."""
    if not adapters:
        raise ConfigError("no adapters to merge", hint="Pass at least one OFT adapter.")
    weights = normalize_weights(weights, len(adapters))
    warnings = [w for a in adapters for w in a.warnings]
    for a in adapters:
        if a.fold_only_reason and options.export != "folded":
            raise IncompatibleInputsError(
                a.fold_only_reason, path=a.label, hint="It can only be folded: pass fold_into=<base model>."
            )
    use_neumann, terms = _output_convention(adapters, options.cayley, warnings)
    modules = _plan_modules(adapters, options.export)
    block_size, rank = (0, 0) if options.export == "folded" else _output_blocks(adapters, modules)
    return OftPlan(
        adapters=list(adapters),
        weights=weights,
        options=options,
        use_cayley_neumann=use_neumann,
        terms=terms,
        block_share=all(a.block_share for a in adapters),
        oft_block_size=block_size,
        oft_rank=rank,
        modules=modules,
        passthrough=_plan_passthrough(adapters, options.export),
        warnings=warnings,
        notes=_form_notes(adapters, options.export),
    )


def _common_size_module(name: str, present: list, adapters: Sequence[OftAdapter], export: str) -> ModulePlan:
    """A module whose inputs share one block size; a ``block_share`` input (one stored block) takes
    the block count of the others."""
    a0, m0 = present[0]
    full = {m.r for _, m in present} - {1}
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
    return ModulePlan(name, m0.kind, m0.b, r, [a.modules.get(name) for a in adapters])


def _mixed_size_module(name: str, present: list, adapters: Sequence[OftAdapter]) -> ModulePlan:
    """A module whose inputs have different block sizes: every input is lifted, exactly, to the
    smallest common multiple of them (`ops.block_lift`); it divides the input width, since each
    block size does."""
    a0, m0 = present[0]
    sizes = sorted({m.b for _, m in present})
    shared = next(((a, m) for a, m in present if a.block_share), None)
    if shared is not None:
        raise IncompatibleInputsError(
            f"a block_share adapter cannot be merged with adapters of other block sizes {sizes}",
            path=shared[0].label,
            tensor=shared[1].key,
            hint="Merge it with adapters of its own block size and block_share setting.",
        )
    width = m0.r * m0.b
    other = next(((a, m) for a, m in present if m.r * m.b != width), None)
    if other is not None:
        raise IncompatibleInputsError(
            f"{other[1].r} blocks of size {other[1].b} here but {m0.r} of size {m0.b} in {a0.label}: "
            "the module shapes differ",
            path=other[0].label,
            tensor=other[1].key,
        )
    size = common_block_size(sizes)  # divides the width, as every block size does
    return ModulePlan(name, m0.kind, size, width // size, [a.modules.get(name) for a in adapters])


def _plan_modules(adapters: Sequence[OftAdapter], export: str) -> list[ModulePlan]:
    """One `ModulePlan` per module any adapter targets, in first-seen order."""
    names: dict[str, None] = {}
    for a in adapters:
        names.update(dict.fromkeys(a.modules))
    plans = []
    for name in names:
        present = [(a, a.modules[name]) for a in adapters if name in a.modules]
        a0, m0 = present[0]
        for a, m in present[1:]:
            if m.kind != m0.kind:
                raise IncompatibleInputsError(
                    f"module is an {m0.kind} in {a0.label} but an {m.kind} here", path=a.label, tensor=m.key
                )
        if len({m.b for _, m in present}) == 1:
            plans.append(_common_size_module(name, present, adapters, export))
        else:
            plans.append(_mixed_size_module(name, present, adapters))
    return plans


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
