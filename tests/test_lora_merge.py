"""`merge_lora_adapters`: several adapters (different ranks and targets), loaded adapters,
LoRA export, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _lora_utils import (
    make_lora_adapter,
    single_thread,  # noqa: F401  (autouse fixture)
)
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file
from test_decouple_ops import ref_merge

from peft_orthomerge import merge_lora_adapters
from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, InputError, NumericalError


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_lora_adapter(build_tiny_llama, root / "a", seed=1, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    make_lora_adapter(
        build_tiny_llama, root / "b", seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "v_proj"]
    )
    return root / "a", root / "b"


def _folded(adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(build_tiny_llama(), adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_different_ranks_and_targets_match_reference(two_adapters, target):
    weights = [0.6, 0.4]
    base = build_tiny_llama().state_dict()
    experts = [_folded(d) for d in two_adapters]
    merged = merge_lora_adapters(build_tiny_llama(), list(two_adapters), weights, target=target).state_dict()
    touched = 0
    for name, w0 in base.items():
        if w0.dim() != 2 or all(torch.equal(e[name], w0) for e in experts):
            assert torch.equal(merged[name], w0), name  # untouched by every adapter: unchanged
            continue
        touched += 1
        ref = ref_merge(w0, [e[name] for e in experts], weights, target)
        assert torch.allclose(merged[name].double(), ref, atol=2e-6, rtol=0), name
    assert touched == 8  # q, v, down (a) and k, v (b) in two layers, v shared


def test_loaded_adapter_names_equal_directories(two_adapters):
    from peft import PeftModel

    from_dirs = merge_lora_adapters(build_tiny_llama(), list(two_adapters)).state_dict()
    peft_model = PeftModel.from_pretrained(build_tiny_llama(), two_adapters[0], adapter_name="a")
    peft_model.load_adapter(two_adapters[1], adapter_name="b")
    merged = merge_lora_adapters(peft_model, ["a", "b"])
    assert not hasattr(merged, "peft_config")
    for name, value in merged.state_dict().items():
        assert torch.allclose(value, from_dirs[name], atol=1e-7), name


def test_export_lora(two_adapters):
    from peft import PeftModel

    model = merge_lora_adapters(build_tiny_llama(), list(two_adapters), residual="ties")
    full_rank = merge_lora_adapters(build_tiny_llama(), list(two_adapters), residual="ties", export="lora", rank=160)
    assert isinstance(full_rank, PeftModel)
    assert full_rank.orthomerge_report.params["lora_max_relative_error"] < 1e-6
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(full_rank(ids).logits, model(ids).logits, atol=1e-4)
    low = merge_lora_adapters(build_tiny_llama(), list(two_adapters), export="lora", rank=2)
    err = low.orthomerge_report.params["lora_max_relative_error"]
    assert 0 < err < 1
    assert any("lora_relative_error" in m.extra for m in low.orthomerge_report.modules)


def test_oft_adapter_is_refused_with_pointer(tmp_path):
    from peft import OFTConfig, get_peft_model

    get_peft_model(build_tiny_llama(), OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "oft"
    )
    with pytest.raises(IncompatibleInputsError, match="merge_oft_adapters"):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "oft"])


def test_missing_target_and_shape_mismatch(tmp_path):
    make_lora_adapter(
        lambda: build_tiny_llama(num_hidden_layers=3), tmp_path / "deep", seed=3, target_modules=["q_proj"]
    )
    with pytest.raises(IncompatibleInputsError, match=r"adapter_model.safetensors: .*layers\.2\.self_attn\.q_proj"):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "deep"])
    make_lora_adapter(lambda: build_tiny_llama(hidden_size=32), tmp_path / "narrow", seed=3, target_modules=["q_proj"])
    with pytest.raises(IncompatibleInputsError, match="do not fit"):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "narrow"])


def test_nan_adapter(two_adapters, tmp_path):
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((two_adapters[0] / "adapter_config.json").read_text())
    state = load_file(two_adapters[0] / "adapter_model.safetensors")
    key = sorted(k for k in state if "lora_B" in k)[0]
    state[key][0, 0] = float("nan")
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(NumericalError, match=key.replace(".", r"\.")):
        merge_lora_adapters(build_tiny_llama(), [two_adapters[1], bad])


def test_bad_arguments(two_adapters, tmp_path):
    adapters = list(two_adapters)
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, [1.0, -1.0])
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, [1.0])
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, export="lora")
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, export="gguf")
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, residual_kwargs={"densty": 0.3}, residual="ties")
    with pytest.raises(ConfigError):
        merge_lora_adapters(build_tiny_llama(), adapters, target="local")
    with pytest.raises(InputError):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "does-not-exist"])
    cfg = json.loads((two_adapters[0] / "adapter_config.json").read_text())
    (tmp_path / "pissa").mkdir()
    (tmp_path / "pissa" / "adapter_config.json").write_text(json.dumps(dict(cfg, init_lora_weights="pissa")))
    with pytest.raises(IncompatibleInputsError, match="different base"):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "pissa"])


def test_dora_on_embeddings_is_refused(tmp_path):
    make_lora_adapter(build_tiny_llama, tmp_path / "dora_emb", seed=4, use_dora=True, target_modules=["embed_tokens"])
    with pytest.raises(IncompatibleInputsError, match="DoRA on embedding"):
        merge_lora_adapters(build_tiny_llama(), [tmp_path / "dora_emb"])


def _relative_difference(a, b):
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@pytest.mark.parametrize("target", ["global", None])
def test_float32_precision_is_close_to_float64(two_adapters, target):
    base = build_tiny_llama().state_dict()
    m64 = merge_lora_adapters(build_tiny_llama(), list(two_adapters), [0.6, 0.4], target=target)
    m32 = merge_lora_adapters(build_tiny_llama(), list(two_adapters), [0.6, 0.4], target=target, precision="float32")
    assert m32.orthomerge_report.params["precision"] == "float32"
    s64, s32 = m64.state_dict(), m32.state_dict()
    changed, differs = 0, False
    for name, want in s64.items():
        got = s32[name]
        assert got.dtype == want.dtype
        if torch.equal(want, base[name]):
            assert torch.equal(got, want), name
            continue
        changed += 1
        differs |= not torch.equal(got, want)
        assert _relative_difference(got, want) < 1e-4, name
        # the merged update itself, not only the weight, agrees
        assert _relative_difference(got - base[name], want - base[name]) < 1e-3, name
    assert changed == 8 and differs  # float32 really computed something (in fp32), and close


def test_invalid_precision(two_adapters):
    for bad in ("float16", "fp32", torch.float32, None):
        with pytest.raises(ConfigError, match="precision"):
            merge_lora_adapters(build_tiny_llama(), list(two_adapters), precision=bad)
