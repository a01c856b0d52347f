"""LoRA adapters that also save whole tensors: ``modules_to_save`` and trained biases.

Each expert is PEFT's own ``merge_and_unload`` of the adapter (which applies the saved copies and
biases); every 2-D tensor must equal the independent dense float64 Algorithm 2 (`ref_merge`),
every 1-D one the weighted mean of its task vectors (TA, ``lam = 1/N``), and tensors no adapter
touches stay the base's.
"""

from __future__ import annotations

import json

import pytest
import torch
from _lora_utils import make_lora_adapter, single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama
from test_decouple_ops import ref_merge

from peft_orthomerge import ConfigError, IncompatibleInputsError, merge_lora_adapters


def _base():
    return build_tiny_llama(attention_bias=True, mlp_bias=True)


def _perturb_saved(model, seed: int) -> None:
    """Give the trainable full copies (modules_to_save, biases) values of their own."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _make(root, name, seed, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    _perturb_saved(model, seed)
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_full")
    return [
        _make(root, "heads", 1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="lora_only"),
        _make(root, "all_bias", 2, target_modules=["q_proj", "down_proj"], bias="all"),
        _make(root, "plain", 3, target_modules=["k_proj"]),
    ]


def _folded(adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(), adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_full_tensors_merge_like_a_full_fine_tune(adapters, target):
    weights = [0.5, 0.3, 0.2]
    base = _base().state_dict()
    experts = [_folded(d) for d in adapters]
    merged_model = merge_lora_adapters(_base(), [str(d) for d in adapters], weights, target=target)
    merged = merged_model.state_dict()
    report = merged_model.orthomerge_report
    touched_2d = touched_1d = 0
    for name, w0 in base.items():
        if all(torch.equal(e[name], w0) for e in experts):
            assert torch.equal(merged[name], w0), name
            continue
        if w0.dim() == 2:
            touched_2d += 1
            ref = ref_merge(w0, [e[name] for e in experts], weights, target)
            assert torch.allclose(merged[name].double(), ref, atol=2e-6, rtol=0), name
        else:
            touched_1d += 1
            ref = w0.double() + sum(w * (e[name].double() - w0.double()) for w, e in zip(weights, experts))
            assert torch.allclose(merged[name].double(), ref, atol=1e-6, rtol=0), name
            assert name in report.passthrough
    assert "lm_head.weight" in {m.name for m in report.modules}
    # q, v, k, down in two layers and lm_head; biases of q, v (lora_only) and of every Linear (all)
    assert touched_2d == 9 and touched_1d == 14


def test_a_resized_vocabulary_is_refused_naming_the_tensor(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "resized"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    state = load_file(adapters[0] / "adapter_model.safetensors")
    state["base_model.model.lm_head.weight"] = torch.zeros(100, 64)
    save_file(state, str(bad / "adapter_model.safetensors"))
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(IncompatibleInputsError, match=r"lm_head\.weight.*resized vocabulary"):
        merge_lora_adapters(base, [str(bad)])
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_lora_export_cannot_hold_full_tensors(adapters):
    with pytest.raises(ConfigError, match="modules_to_save or biases"):
        merge_lora_adapters(_base(), [str(adapters[0])], export="lora", rank=4)


def test_a_tied_base_tensor_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    tied = build_tiny_llama(tie_word_embeddings=True)
    model = get_peft_model(tied, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    with pytest.raises(IncompatibleInputsError, match="tied"):
        merge_lora_adapters(build_tiny_llama(tie_word_embeddings=True), [str(tmp_path / "a")])


def test_adapters_without_full_tensors_are_unchanged_by_the_feature(tmp_path):
    """The plain case goes through the same code as before (no full tensors planned)."""
    make_lora_adapter(build_tiny_llama, tmp_path / "p", seed=5, target_modules=["q_proj"])
    report = merge_lora_adapters(build_tiny_llama(), [str(tmp_path / "p")]).orthomerge_report
    assert report.passthrough == [] and [m.name for m in report.modules][:1] == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
