"""In-memory models given as merge inputs: refusing a base that already carries PEFT layers."""

from __future__ import annotations

from typing import Any

from ..errors import IncompatibleInputsError


def tuner_layer_names(model: Any) -> list[str]:
    """Names of the PEFT tuner layers (LoRA, OFT, ...) injected into ``model``'s modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def check_plain_base(model: Any, function: str) -> None:
    """Refuse a model that is not a `PeftModel` but carries PEFT tuner layers.

    PEFT injects its layers in place: after ``merge_oft_adapters(base, ...)`` the ``base`` object
    itself holds OFT layers, and merging again from it would silently start from the adapted
    model. A `PeftModel` is fine (its base weights are known)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return
    layers = tuner_layer_names(model)
    if layers:
        raise IncompatibleInputsError(
            f"the model passed to {function} is not a plain base: PEFT adapter layers were injected into it "
            f"({len(layers)} modules, e.g. {layers[0]}; merge_oft_adapters and get_peft_model modify the model they get)",
            hint="Load a fresh base model, or pass the PeftModel that holds those layers.",
        )
