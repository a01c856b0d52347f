"""Merging LoRA adapters module by module: each adapted weight decoupled, each LoRA bias merged.

Per module the experts are PEFT's exact folds ``W_i = W0 + delta_i`` (`sources.lora`); a module
an adapter does not touch contributes ``W0`` (a zero task vector). ``Conv1D`` weights
(``fan_in_fan_out``, stored ``(in, out)``) are transposed for the math, so the rotation acts on
the input side of ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, IncompatibleInputsError
from ..ops.registry import get_euclidean
from ..plan.lora import FullTarget, LoraTarget
from ..plan.options import DecoupleOptions
from ..report import MergeReport
from ..sources.lora import LoraAdapter
from .tensor import decoupled_stats, finite_output, merge_tensor


def _expert_weight(
    source: LoraAdapter, key: str, w0: torch.Tensor, fan_in_fan_out: bool, dtype: torch.dtype
) -> torch.Tensor:
    """One adapter's full weight of module ``key``: its LoRA fold, its saved weight, or ``W0``."""
    if key in source.modules:
        return source.expert_weight(key, w0, fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    if f"{key}.weight" in source.full:
        return source.full_tensor(f"{key}.weight").to(w0.dtype)
    return w0


def merge_full_tensors(
    plan: dict[str, FullTarget],
    sources: Sequence[LoraAdapter],
    weights: Sequence[float],
    options: DecoupleOptions,
    report: MergeReport,
) -> dict[str, torch.Tensor]:
    """Every full tensor (``modules_to_save``, trained biases) merged like a full fine-tune's: 2-D
    ones decoupled (the rotation on the input side; ``Conv1D`` weights transposed for the math),
    the others by the residual method; adapters without the tensor contribute the base value.
    Returns name -> merged tensor (stored layout, compute dtype)."""
    merged: dict[str, torch.Tensor] = {}
    for name, target in plan.items():
        w0 = target.param.detach()
        experts = [s.full_tensor(name).to(w0.dtype) if name in s.full else w0 for s in sources]
        if target.transposed:
            w0, experts = w0.T, [e.T for e in experts]
        decoupled = options.target is not None and w0.dim() == 2
        out, stats = merge_tensor(name, w0, experts, weights, options, decoupled=decoupled, device=w0.device)
        if decoupled:
            report.modules.append(decoupled_stats(name, stats, float(torch.linalg.matrix_norm(torch.sub(out, w0)))))
        else:
            report.passthrough.append(name)
        merged[name] = out.T if target.transposed else out
    return merged


def merge_lora_weight(
    target: LoraTarget, sources: Sequence[LoraAdapter], weights: Sequence[float], options: DecoupleOptions
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The merged weight of one module (stored layout, compute dtype), its merged delta in the math
    layout, and the merge statistics."""
    key, fan_in_fan_out = target.key, target.fan_in_fan_out
    w0 = target.module.weight.detach()
    experts = [_expert_weight(s, key, w0, fan_in_fan_out, options.dtype) for s in sources]
    if fan_in_fan_out:
        w0, experts = w0.T, [e.T for e in experts]
    out, stats = merge_tensor(
        f"{key}.weight", w0, experts, weights, options, decoupled=options.target is not None, device=w0.device
    )
    delta = torch.sub(out, w0)
    return (out.T if fan_in_fan_out else out), delta, stats


def merge_lora_bias(
    target: LoraTarget,
    sources: Sequence[LoraAdapter],
    weights: Sequence[float],
    options: DecoupleOptions,
    report: MergeReport,
    export: str,
) -> None:
    """Merge the LoRA biases (``lora_bias=True``) of one module into the base module's bias, in
    float64, by the residual method; adapters without one contribute a zero task vector."""
    key, module = target.key, target.module
    bias_taus = [s.bias_delta(key) if key in s.modules else None for s in sources]
    if all(b is None for b in bias_taus):
        return
    bias = getattr(module, "bias", None)
    if bias is None:
        raise IncompatibleInputsError("adapter trains a LoRA bias but the base module has none", tensor=f"{key}.bias")
    if export == "lora":
        raise ConfigError(
            "LoRA biases (lora_bias=True) cannot be exported as a LoRA adapter; use export='model'",
            tensor=f"{key}.bias",
        )
    taus = [
        t.to(bias.device) if t is not None else torch.zeros(bias.shape, dtype=torch.float64, device=bias.device)
        for t in bias_taus
    ]
    name = f"{key}.bias"
    base = bias.detach().double()
    fn = get_euclidean(options.residual)
    delta = fn(taus, list(weights), base=base, generator=options.generator(name, bias.device), **options.method_kwargs)
    bias.data.copy_(finite_output((bias.detach().double() + delta).to(bias.dtype), name))
    report.passthrough.append(name)


def merge_lora_modules(
    plan: dict[str, LoraTarget],
    sources: Sequence[LoraAdapter],
    weights: Sequence[float],
    options: DecoupleOptions,
    report: MergeReport,
    export: str,
) -> dict[str, torch.Tensor]:
    """Every planned module merged (biases written into the base modules as they go); returns
    module key -> merged weight (stored layout, compute dtype); per-module statistics go to ``report``."""
    merged: dict[str, torch.Tensor] = {}
    for key, target in plan.items():
        out, delta, stats = merge_lora_weight(target, sources, weights, options)
        report.modules.append(decoupled_stats(f"{key}.weight", stats, float(torch.linalg.matrix_norm(delta))))
        merged[key] = out
        merge_lora_bias(target, sources, weights, options, report, export)
    return merged
