"""LoRA folding against PEFT's own ``merge_and_unload``, one variant at a time.

With a single adapter, ``target=None`` (Euclidean TA mean of one task vector) must give exactly
PEFT's merged weights, and the decoupled path (``target="global"``: ``W0 @ P + (W1 - W0 @ P)``)
must give them too, to rounding.
"""

from __future__ import annotations

import pytest
import torch
from _lora_utils import (
    make_lora_adapter,
    single_thread,  # noqa: F401  (autouse fixture)
)
from conftest import build_tiny_llama

from peft_orthomerge import merge_lora_adapters
from peft_orthomerge.ops.lora_fold import lora_delta, lora_scaling, module_rank_alpha


def build_tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


VARIANTS = {
    "plain": (build_tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (build_tiny_llama, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj"])),
    "patterns": (
        build_tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
            alpha_pattern={"q_proj": 16, "down_proj": 3},
        ),
    ),
    "embedding": (build_tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "up_proj"])),
    "dora": (
        build_tiny_llama,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "gpt2_fan_in_fan_out": (
        build_tiny_gpt2,
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
}


def _peft_merged(factory, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(factory(), adapter_dir).merge_and_unload()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_matches_peft_merge_and_unload(variant, tmp_path):
    factory, config = VARIANTS[variant]
    make_lora_adapter(factory, tmp_path / "a", seed=1, **config)
    expected = _peft_merged(factory, tmp_path / "a").state_dict()
    base = factory().state_dict()
    plain = merge_lora_adapters(factory(), [tmp_path / "a"], target=None)
    decoupled = merge_lora_adapters(factory(), [tmp_path / "a"], target="global")
    changed = 0
    for name, want in expected.items():
        assert torch.allclose(plain.state_dict()[name], want, atol=1e-6, rtol=0), name
        assert torch.allclose(decoupled.state_dict()[name], want, atol=1e-5, rtol=0), name
        changed += not torch.equal(want, base[name])
    assert changed >= 2
    report = decoupled.orthomerge_report
    assert report.kind == "lora" and report.modules
    # single expert: the residual is what the rotation does not explain; both parts are reported
    for m in report.modules:
        assert m.extra["task_vector_norm_0"] > 0
        assert "orth_part_norm_0" in m.extra and "residual_norm_0" in m.extra


def test_scaling_rules_match_peft_layers(tmp_path):
    factory, config = VARIANTS["patterns"]
    peft_model = make_lora_adapter(factory, tmp_path / "a", seed=2, **config)
    cfg = peft_model.peft_config["default"].to_dict()
    seen = 0
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert lora_scaling(cfg, name) == pytest.approx(module.scaling["default"])
            assert module_rank_alpha(cfg, name)[0] == module.r["default"]
            got = lora_delta(module.lora_A["default"].weight, module.lora_B["default"].weight, lora_scaling(cfg, name))
            assert torch.allclose(got, module.get_delta_weight("default"), atol=1e-7)
            seen += 1
    assert seen == 6
    rs = dict(cfg, use_rslora=True, rank_pattern={}, alpha_pattern={}, r=9, lora_alpha=6)
    assert lora_scaling(rs, "x") == pytest.approx(6 / 3)
