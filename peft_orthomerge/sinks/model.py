"""The in-memory sink: merged weights copied into the modules of a loaded model, in place."""

from __future__ import annotations

import torch

from ..merge.tensor import finite_output
from ..plan.lora import FullTarget, LoraTarget


def write_into_model(
    plan: dict[str, LoraTarget],
    merged: dict[str, torch.Tensor],
    full: dict[str, FullTarget] | None = None,
    merged_full: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy each merged module weight (stored layout) into its module and each merged full tensor
    into its parameter, cast to their dtype; `NumericalError` for a value that is not finite there
    (overflow in a half-precision model)."""
    for key, target in plan.items():
        weight = target.module.weight
        weight.data.copy_(finite_output(merged[key].to(weight.dtype), f"{key}.weight"))
    for name, target in (full or {}).items():
        target.param.data.copy_(finite_output(merged_full[name].to(target.param.dtype), name))
