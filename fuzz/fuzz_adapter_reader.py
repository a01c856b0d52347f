"""Fuzz entry: bytes -> (adapter_model.safetensors, adapter_config.json) -> the readers.

Exercises `TensorReader` (headers, every tensor's data with NaN/Inf checks), the OFT adapter
reader (config validation, tensor layout, conversion to canonical skew vectors) and the LoRA
adapter reader (config validation, scaling, folding against a small base weight). Anything other
than an `OrthoMergeError` escaping is a crash.

Run: ``python fuzz/fuzz_adapter_reader.py -max_total_time=60`` (libFuzzer flags; needs atheris).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import coherent_adapter, config_bytes, is_known_bug, provider, safetensors_bytes

try:
    import atheris
except ImportError:  # hypothesis fallback imports `one_input` only
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["peft_orthomerge"]):
        from peft_orthomerge.errors import OrthoMergeError
        from peft_orthomerge.sources.lora import read_adapter_dir as read_lora_dir
        from peft_orthomerge.sources.oft import read_adapter_dir
        from peft_orthomerge.sources.tensors import TensorReader
else:
    from peft_orthomerge.errors import OrthoMergeError
    from peft_orthomerge.sources.lora import read_adapter_dir as read_lora_dir
    from peft_orthomerge.sources.oft import read_adapter_dir
    from peft_orthomerge.sources.tensors import TensorReader

# Reported bugs, tolerated so fuzzing goes past them; each has a strict xfail test in
# tests/test_hostile_oft.py / tests/test_hostile_lora.py. Remove an entry once it is fixed.
KNOWN_BUGS: list[tuple[type, str, str]] = []

_WORK = Path(tempfile.mkdtemp(prefix="fuzz-adapter-"))
atexit.register(shutil.rmtree, _WORK, True)


def check_directory(directory: Path) -> None:
    """Read everything in ``directory`` through the public readers; only OrthoMergeError may escape."""
    try:
        reader = TensorReader.from_dir(directory, "adapter_model")
        for key in reader.keys():
            shape = reader.shape(key)
            tensor = reader.get(key)
            assert tuple(tensor.shape) == shape, (key, shape, tensor.shape)
    except OrthoMergeError:
        pass
    try:
        adapter = read_adapter_dir(str(directory), directory)
        adapter.use_cayley_neumann, adapter.block_share, adapter.terms  # noqa: B018 - config accessors
        for name in adapter.modules:
            adapter.canonical(name)
            adapter.output_scale(name)
        for key in adapter.passthrough:
            adapter.tensors.get(key)
    except OrthoMergeError:
        pass
    except Exception as exc:
        if not is_known_bug(exc, KNOWN_BUGS):
            raise
    try:
        lora = read_lora_dir(str(directory), directory)
        for key in lora.modules:
            lora.scaling(key)
            lora.expert_weight(key, torch.zeros(6, 4), fan_in_fan_out=False)
            lora.bias_delta(key)
    except OrthoMergeError:
        pass
    except Exception as exc:
        if not is_known_bug(exc, KNOWN_BUGS):
            raise


def one_input(data: bytes) -> None:
    fdp = provider(data)
    if fdp.ConsumeBool():
        weights, config = coherent_adapter(fdp)
    else:
        weights, config = safetensors_bytes(fdp), config_bytes(fdp)
    (_WORK / "adapter_model.safetensors").write_bytes(weights)
    (_WORK / "adapter_config.json").write_bytes(config)
    check_directory(_WORK)


if __name__ == "__main__":
    from _common import run_atheris

    run_atheris(one_input)
