"""Bad input to the OFT path: a specific `OrthoMergeError` naming the file / tensor, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _oft_utils import make_oft_adapter
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from peft_orthomerge import (
    ConfigError,
    IncompatibleInputsError,
    InputError,
    NumericalError,
    OrthoMergeError,
    OutputError,
    UnsafeInputError,
    merge_oft_adapters,
    merge_oft_checkpoints,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    build_tiny_llama().save_pretrained(root / "base")
    a = make_oft_adapter(root / "a", seed=1)
    b = make_oft_adapter(root / "b", seed=2, neumann=False)
    return root, a, b


def _copy(src, dst, *, config=None, state=None):
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "adapter_config.json").read_text())
        config(data)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if state is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        state(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _first_oft_key(tensors):
    return next(k for k in tensors if k.endswith("oft_R.weight"))


def _make_bad(kind, root, a, tmp):
    """Return (adapters, kwargs, expected error, text the message must contain)."""
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        get_peft_model(build_tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp / "lora")
        return [a, tmp / "lora"], {}, IncompatibleInputsError, "merge_lora_adapters"
    if kind == "other-base":
        other = make_oft_adapter(tmp / "other", seed=3, model=build_tiny_llama(hidden_size=32, intermediate_size=64))
        return [a, other], {}, IncompatibleInputsError, "shapes differ"
    if kind == "block-size":  # different block sizes merge (issue 13), except with a block_share adapter
        other = make_oft_adapter(tmp / "bs8", seed=3, oft_block_size=8, block_share=True)
        return [a, other], {}, IncompatibleInputsError, "block size"
    if kind == "fold-other-base":
        build_tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(tmp / "small")
        return [a], {"fold_into": tmp / "small"}, IncompatibleInputsError, "do not fit"
    if kind == "nan":
        bad = _copy(a, tmp / "nan", state=lambda t: t[_first_oft_key(t)].__setitem__((0, 0), float("nan")))
        return [bad], {}, NumericalError, "oft_R.weight"
    if kind == "missing-dir":
        return [a, tmp / "nowhere"], {}, InputError, "nowhere"
    if kind == "missing-weights":
        bad = _copy(a, tmp / "noweights")
        (bad / "adapter_model.safetensors").unlink()
        return [bad], {}, InputError, "adapter_model"
    if kind == "missing-config":
        bad = _copy(a, tmp / "noconfig")
        (bad / "adapter_config.json").unlink()
        return [bad], {}, InputError, "adapter_config.json"
    if kind == "pickle":
        bad = _copy(a, tmp / "pickle")
        torch.save(load_file(bad / "adapter_model.safetensors"), bad / "adapter_model.bin")
        (bad / "adapter_model.safetensors").unlink()
        return [bad], {}, UnsafeInputError, "adapter_model.bin"
    if kind == "peft-0.13":
        bad = _copy(a, tmp / "old", config=lambda c: c.pop("oft_block_size"))
        return [bad], {}, IncompatibleInputsError, "0.13"
    if kind == "not-triangular":
        bad = _copy(a, tmp / "tri", state=lambda t: t.__setitem__(_first_oft_key(t), torch.zeros(4, 119)))
        return [bad], {}, InputError, "oft_R.weight"
    if kind == "empty":
        return [], {}, ConfigError, "no adapters"
    if kind == "weights-length":
        return [a], {"weights": [1, 2]}, ConfigError, "weights"
    if kind == "weights-negative":
        return [a, a], {"weights": [1, -1]}, ConfigError, "non-negative"
    if kind == "weights-zero":
        return [a, a], {"weights": [0, 0]}, ConfigError, "zero"
    if kind == "weights-nan":
        return [a, a], {"weights": [1, float("nan")]}, ConfigError, "finite"
    if kind == "mean_r-adapter":
        return [a, a], {"method": "mean_r"}, ConfigError, "fold_into"
    if kind == "unknown-method":
        return [a], {"method": "average"}, ConfigError, "orthomerge"
    if kind == "granularity":
        return [a], {"granularity": "layer"}, ConfigError, "granularity"
    if kind == "cayley":
        return [a], {"cayley": "fast"}, ConfigError, "cayley"
    if kind == "scale":
        return [a], {"scale": float("inf")}, ConfigError, "scale"
    raise AssertionError(kind)


BAD = [
    "lora", "other-base", "block-size", "fold-other-base", "nan", "missing-dir", "missing-weights",
    "missing-config", "pickle", "peft-0.13", "not-triangular", "empty", "weights-length",
    "weights-negative", "weights-zero", "weights-nan", "mean_r-adapter", "unknown-method",
    "granularity", "cayley", "scale",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_raises_and_writes_nothing(good, tmp_path, kind):
    root, a, _ = good
    adapters, kwargs, error, text = _make_bad(kind, root, a, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        merge_oft_checkpoints(adapters, out, **kwargs)
    assert text in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_pickle_opt_in_loads_weights_only(good, tmp_path):
    _, a, _ = good
    adapters, _, _, _ = _make_bad("pickle", None, a, tmp_path)
    merge_oft_checkpoints(adapters, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_output_dir_rules(good, tmp_path):
    _, a, b = good
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="not empty"):
        merge_oft_checkpoints([a, b], out)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(OutputError, match="input"):
        merge_oft_checkpoints([a, b], a / "merged")
    assert not (a / "merged").exists()
    merge_oft_checkpoints([a, b], out, overwrite=True)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_in_memory_errors(good):
    _, a, _ = good
    model = build_tiny_llama()
    with pytest.raises(ConfigError):
        merge_oft_adapters(model, [str(a)], method="mean_r")
    with pytest.raises(ConfigError):
        merge_oft_adapters(model, [])
    with pytest.raises(InputError):
        merge_oft_adapters(model, ["not-a-loaded-adapter-or-dir"])
    merged = merge_oft_adapters(model, [str(a)], adapter_name="m")
    with pytest.raises(ConfigError, match="already"):
        merge_oft_adapters(merged, [str(a)], adapter_name="m")


def test_all_errors_share_the_base_class():
    for cls in (ConfigError, IncompatibleInputsError, InputError, NumericalError, OutputError, UnsafeInputError):
        assert issubclass(cls, OrthoMergeError)
