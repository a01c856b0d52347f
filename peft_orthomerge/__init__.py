"""peft-orthomerge: merge OFT adapters, LoRA adapters and full fine-tunes on the orthogonal group.

Public API (imported lazily so that ``import peft_orthomerge`` and the CLI start fast):

- `merge_oft_adapters`, `merge_oft_checkpoints`: OFT adapters merged in so(b).
- `merge_lora_adapters`, `merge_models`: orthogonal-residual decoupling of LoRA adapters / full fine-tunes.
- `push_to_hub`: upload a finished output directory.
- `compare_methods`: run several merge methods on your models and score them with your own evaluation.
- `MergeReport`, `OrthoMergeError` and its subclasses.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    ConfigError,
    IncompatibleInputsError,
    InputError,
    NumericalError,
    OrthoMergeError,
    OutputError,
    UnsafeInputError,
)
from .report import MergeReport, ModuleStats

__version__ = "0.1.0"

_LAZY = {
    "merge_oft_adapters": "peft_orthomerge.api.oft",
    "merge_oft_checkpoints": "peft_orthomerge.api.oft",
    "merge_lora_adapters": "peft_orthomerge.api.decouple",
    "merge_models": "peft_orthomerge.api.decouple",
    "push_to_hub": "peft_orthomerge.hub",
    "compare_methods": "peft_orthomerge.compare",
}

__all__ = [
    "ConfigError",
    "IncompatibleInputsError",
    "InputError",
    "MergeReport",
    "ModuleStats",
    "NumericalError",
    "OrthoMergeError",
    "OutputError",
    "UnsafeInputError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_orthomerge' has no attribute {name!r}")
