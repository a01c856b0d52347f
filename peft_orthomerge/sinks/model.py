"""The in-memory sink: merged weights copied into the modules of a loaded model, in place."""

from __future__ import annotations

import torch

from ..merge.tensor import finite_output
from ..plan.lora import LoraTarget


def write_into_model(plan: dict[str, LoraTarget], merged: dict[str, torch.Tensor]) -> None:
    """Copy each merged weight (stored layout) into its module, cast to the module's dtype;
    `NumericalError` for a value that is not finite there (overflow in a half-precision model)."""
    for key, target in plan.items():
        weight = target.module.weight
        weight.data.copy_(finite_output(merged[key].to(weight.dtype), f"{key}.weight"))
