"""OFT variants: block_share, embeddings, Conv2d, coft, bias / modules_to_save, legacy PEFT 0.15.2 files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _oft_utils import (
    PREFIX,
    folded_state,
    logits_with_state,
    make_oft_adapter,
    merged_reference,
    oft_modules,
    read_adapter,
    ref_canonical,
    ref_fold,
    ref_orthomerge,
    ref_peft_rotation,
    ref_skew,
    ref_vec,
    token_ids,
)
from conftest import build_tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from peft_orthomerge import IncompatibleInputsError, merge_oft_adapters, merge_oft_checkpoints

LEGACY = Path(__file__).parent / "fixtures" / "legacy-oft-peft-0.15.2"


def _rotations(ref):
    return {name: (kind, rot) for name, (kind, _, rot) in ref.items()}


def _reloaded_logits(adapter_dir, ids, **overrides):
    model = PeftModel.from_pretrained(build_tiny_llama(**overrides), adapter_dir)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", ["block_share", "embedding", "rank"])
def test_variant_adapter_and_fold_match_reference(tmp_path, variant):
    if variant == "block_share":
        kwargs = dict(block_share=True)
    elif variant == "rank":  # configured by the number of blocks: b = 16 for q/v, 40 for down_proj
        kwargs = dict(r=4, oft_block_size=0)
    else:
        kwargs = dict(targets=("embed_tokens", "q_proj", "o_proj"))
    dirs = [make_oft_adapter(tmp_path / f"a{i}", seed=10 + i, neumann=bool(i % 2), **kwargs) for i in range(2)]
    base = build_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    merge_oft_checkpoints(dirs, tmp_path / "out", [1, 2])
    merge_oft_checkpoints(dirs, tmp_path / "folded", [1, 2], fold_into=tmp_path / "base")
    ref = merged_reference(dirs, [1, 2])
    config, state = read_adapter(tmp_path / "out")
    stored = oft_modules(state)
    for name, (kind, vec, _) in ref.items():
        assert stored[name][0] == kind
        torch.testing.assert_close(stored[name][1].double(), vec, rtol=1e-5, atol=1e-7)
    if variant == "block_share":
        assert config["block_share"] is True and all(v.shape[0] == 1 for _, v in stored.values())
    elif variant == "rank":
        assert (config["r"], config["oft_block_size"]) == (4, 0)
        assert {v.shape[1] for _, v in stored.values()} == {16 * 15 // 2, 40 * 39 // 2}
    else:
        assert stored["model.embed_tokens"][0] == "embedding"
    expected = folded_state(base.state_dict(), _rotations(ref))
    ids = token_ids()
    torch.testing.assert_close(
        _reloaded_logits(tmp_path / "out", ids), logits_with_state(expected, ids), rtol=1e-4, atol=1e-5
    )
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(folded[key], value, rtol=1e-5, atol=1e-6)


def test_mixed_block_share(tmp_path):
    shared = make_oft_adapter(tmp_path / "shared", seed=50, block_share=True, targets=("q_proj", "down_proj"))
    full = make_oft_adapter(tmp_path / "full", seed=51, targets=("q_proj", "v_proj"))
    base = build_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    # down_proj is only targeted by the shared adapter: its block count is unknown without the base
    with pytest.raises(IncompatibleInputsError, match="block_share"):
        merge_oft_checkpoints([shared, full], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_oft_checkpoints([shared, full], tmp_path / "folded", [2, 1], fold_into=tmp_path / "base")
    expected = folded_state(base.state_dict(), _rotations(merged_reference([shared, full], [2, 1])))
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(folded[key], value, rtol=1e-5, atol=1e-6)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 2)  # rotated dim: 4 * 2 * 2 = 16
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(-1, -2)))


def test_conv2d_fold_matches_reference_and_peft(tmp_path):
    dirs = [
        make_oft_adapter(
            tmp_path / f"c{i}", seed=20 + i, neumann=True, model=TinyConv(), targets=("conv",), oft_block_size=8
        )
        for i in range(2)
    ]
    base = TinyConv()
    (tmp_path / "base").mkdir()
    save_file(base.state_dict(), tmp_path / "base" / "model.safetensors")
    merge_oft_checkpoints(dirs, tmp_path / "folded", fold_into=tmp_path / "base")
    ref = merged_reference(dirs)
    assert ref["conv"][2].shape == (2, 8, 8)
    expected = ref_fold(base.conv.weight.detach(), ref["conv"][2])
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    torch.testing.assert_close(folded["conv.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded["head.weight"], base.head.weight.detach(), rtol=0, atol=0)
    merged = merge_oft_adapters(TinyConv(), [str(d) for d in dirs]).merge_and_unload()
    torch.testing.assert_close(merged.conv.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)


def _coft_projected(stored: torch.Tensor, eps: float) -> torch.Tensor:
    """Dense COFT projection: each skew block to Frobenius norm <= eps / sqrt(rows)."""
    q = ref_skew(stored)
    radius = eps / math.sqrt(q.shape[0])
    for k in range(q.shape[0]):
        norm = torch.sqrt((q[k] ** 2).sum())
        if norm > radius:
            q[k] = q[k] * (radius / norm)
    return ref_vec(q)


def test_coft_adapters_load_to_exactly_the_merged_rotation(tmp_path):
    eps = 0.4
    dirs = [make_oft_adapter(tmp_path / f"k{i}", seed=30 + i, coft=True, eps=eps, neumann=False) for i in range(2)]
    ids = token_ids()
    # single adapter: the merged adapter (coft off) reproduces PEFT's own forward of the coft adapter
    merge_oft_checkpoints([dirs[0]], tmp_path / "single")
    assert read_adapter(tmp_path / "single")[0]["coft"] is False
    torch.testing.assert_close(
        _reloaded_logits(tmp_path / "single", ids), _reloaded_logits(dirs[0], ids), rtol=1e-4, atol=1e-5
    )
    # two adapters: dense merge of the projected blocks
    merge_oft_checkpoints(dirs, tmp_path / "pair")
    states = [oft_modules(read_adapter(d)[1]) for d in dirs]
    rotations = {}
    for name in states[0]:
        qs = [ref_canonical(_coft_projected(s[name][1], eps), False) for s in states]
        assert float(torch.sqrt((qs[0] ** 2).sum(dim=(1, 2))).max()) <= eps / math.sqrt(qs[0].shape[0]) * (1 + 1e-9)
        q = ref_orthomerge(qs, [1, 1])
        rotations[name] = ("linear", ref_peft_rotation(-q, False))
    expected = logits_with_state(folded_state(build_tiny_llama().state_dict(), rotations), ids)
    torch.testing.assert_close(_reloaded_logits(tmp_path / "pair", ids), expected, rtol=1e-4, atol=1e-5)


def test_bias_and_modules_to_save_are_averaged(tmp_path):
    overrides = dict(attention_bias=True)
    kwargs = dict(bias="oft_only", modules_to_save=["lm_head"], perturb=0.05, targets=("q_proj", "v_proj"))
    dirs = [
        make_oft_adapter(tmp_path / f"b{i}", seed=40 + i, model=build_tiny_llama(**overrides), **kwargs)
        for i in range(2)
    ]
    base = build_tiny_llama(**overrides)
    base.save_pretrained(tmp_path / "base")
    weights = [1.0, 3.0]
    report = merge_oft_checkpoints(dirs, tmp_path / "out", weights)
    merge_oft_checkpoints(dirs, tmp_path / "folded", weights, fold_into=tmp_path / "base")
    states = [read_adapter(d)[1] for d in dirs]
    plain = [k for k in states[0] if not k.endswith("oft_R.weight")]
    assert sorted(report.passthrough) == sorted(plain) and any(k.endswith("lm_head.weight") for k in plain)
    expected = folded_state(base.state_dict(), _rotations(merged_reference(dirs, weights)))
    for key in plain:
        mean = (0.25 * states[0][key].double() + 0.75 * states[1][key].double()).float()
        assert not torch.allclose(states[0][key], states[1][key])
        expected[key[len(PREFIX) :].replace(".base_layer.", ".")] = mean
    ids = token_ids()
    torch.testing.assert_close(
        _reloaded_logits(tmp_path / "out", ids, **overrides),
        logits_with_state(expected, ids, **overrides),
        rtol=1e-4,
        atol=1e-5,
    )
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(folded[key], value, rtol=1e-5, atol=1e-6)


def _legacy_expected(name):
    data = load_file(LEGACY / name / "expected_logits.safetensors")
    return data["input_ids"], data["logits"]


def test_legacy_convertible_adapter_reproduces_peft_0_15_2(tmp_path):
    report = merge_oft_checkpoints([LEGACY / "legacy-oft-s1"], tmp_path / "out")
    assert any("legacy" in w for w in report.warnings)
    ids, logits = _legacy_expected("legacy-oft-s1")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LEGACY / "base"), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
    merged = merge_oft_adapters(AutoModelForCausalLM.from_pretrained(LEGACY / "base"), [str(LEGACY / "legacy-oft-s1")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_legacy_scaled_adapter_is_fold_only(tmp_path):
    with pytest.raises(IncompatibleInputsError, match="oft_s"):
        merge_oft_checkpoints([LEGACY / "legacy-oft-scaled"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_oft_checkpoints([LEGACY / "legacy-oft-scaled"], tmp_path / "folded", fold_into=LEGACY / "base")
    ids, logits = _legacy_expected("legacy-oft-scaled")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
