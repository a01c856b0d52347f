"""OFT adapters of one base with different block sizes (8, 16, 32) merge in adapter space.

Reference: each adapter's generator is built densely over the whole input dimension
(`torch.block_diag` of its own blocks), the OrthoMerge formula is applied to the dense
generators (module granularity: norms over the whole module), and the merged rotation is PEFT's
map of the dense merged generator, folded densely. Nothing is shared with the library.
"""

from __future__ import annotations

import pytest
import torch
from _oft_utils import (
    logits_with_state,
    make_oft_adapter,
    oft_modules,
    read_adapter,
    ref_canonical,
    ref_fold,
    ref_peft_rotation,
    token_ids,
)
from conftest import build_tiny_llama
from peft import PeftModel

from peft_orthomerge import IncompatibleInputsError, merge_oft_checkpoints

SIZES = (8, 16, 32)
TARGETS = ("q_proj", "v_proj", "down_proj")  # in_features 64, 64, 160: each a multiple of 32


def _dense_generator(stored: torch.Tensor, neumann: bool) -> torch.Tensor:
    return torch.block_diag(*ref_canonical(stored, neumann))


def _reference_state(dirs, weights, out_neumann: bool):
    adapters = [read_adapter(d) for d in dirs]
    base = build_tiny_llama().state_dict()
    state = dict(base)
    for name in oft_modules(adapters[0][1]):
        qs = [_dense_generator(oft_modules(s)[name][1], cfg["use_cayley_neumann"]) for cfg, s in adapters]
        total = sum(w * q for w, q in zip(weights, qs))
        norm = sum(w * torch.linalg.matrix_norm(q) for w, q in zip(weights, qs))
        merged = norm * total / torch.linalg.matrix_norm(total)
        stored = merged if out_neumann else -merged
        rotation = ref_peft_rotation(stored[None], out_neumann)[0]
        key = f"{name}.weight"
        state[key] = ref_fold(base[key], rotation[None], "linear").to(base[key].dtype)
    return state


@pytest.mark.parametrize("neumann", [True, False])
def test_mixed_block_sizes_merge_as_an_adapter_that_peft_reloads(tmp_path, neumann):
    dirs = [
        make_oft_adapter(tmp_path / f"b{b}", seed=90 + i, neumann=neumann, targets=TARGETS, oft_block_size=b)
        for i, b in enumerate(SIZES)
    ]
    weights = [0.5, 0.3, 0.2]
    merge_oft_checkpoints(dirs, tmp_path / "out", weights)
    config, state = read_adapter(tmp_path / "out")
    assert config["oft_block_size"] == 32
    assert {name: v.shape for name, (_, v) in oft_modules(state).items()} == {
        "model.layers.0.self_attn.q_proj": (2, 32 * 31 // 2),
        "model.layers.0.self_attn.v_proj": (2, 32 * 31 // 2),
        "model.layers.0.mlp.down_proj": (5, 32 * 31 // 2),
        "model.layers.1.self_attn.q_proj": (2, 32 * 31 // 2),
        "model.layers.1.self_attn.v_proj": (2, 32 * 31 // 2),
        "model.layers.1.mlp.down_proj": (5, 32 * 31 // 2),
    }
    ids = token_ids()
    expected = logits_with_state(_reference_state(dirs, weights, neumann), ids)
    model = PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    build_tiny_llama().save_pretrained(tmp_path / "base")
    merge_oft_checkpoints(dirs, tmp_path / "folded", weights, fold_into=tmp_path / "base")
    from transformers import AutoModelForCausalLM

    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_modules_that_end_at_different_block_sizes_are_folded_not_written_as_one_adapter(tmp_path):
    """q_proj lifts to lcm(16, 32) = 32 and down_proj to lcm(16, 40) = 80: one OFT config cannot
    describe both, so the adapter export says why and points to the folded export, which works."""
    dirs = [
        make_oft_adapter(tmp_path / "b16", seed=101, targets=("q_proj", "down_proj"), oft_block_size=16),
        make_oft_adapter(tmp_path / "b32", seed=102, targets=("q_proj",), oft_block_size=32),
        make_oft_adapter(tmp_path / "b40", seed=103, targets=("down_proj",), oft_block_size=40),
    ]
    with pytest.raises(IncompatibleInputsError, match=r"block sizes \[32, 80\].*fold_into") as info:
        merge_oft_checkpoints(dirs, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and "one OFT config cannot describe" in str(info.value)
    build_tiny_llama().save_pretrained(tmp_path / "base")
    merge_oft_checkpoints(dirs, tmp_path / "folded", fold_into=tmp_path / "base")
    from safetensors.torch import load_file

    folded = load_file(tmp_path / "folded" / "model.safetensors")
    adapters = [read_adapter(d) for d in dirs]
    base = build_tiny_llama().state_dict()
    weights = [1 / 3] * 3
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        width = base[f"{name}.weight"].shape[1]
        qs = []
        for cfg, state in adapters:
            mods = oft_modules(state)
            zero = torch.zeros(width, width, dtype=torch.float64)
            qs.append(_dense_generator(mods[name][1], cfg["use_cayley_neumann"]) if name in mods else zero)
        total = sum(w * q for w, q in zip(weights, qs))
        merged = (
            sum(w * torch.linalg.matrix_norm(q) for w, q in zip(weights, qs)) * total / torch.linalg.matrix_norm(total)
        )
        rotation = ref_peft_rotation(merged[None], True)[0]  # every input uses the Neumann flag
        expected = ref_fold(base[f"{name}.weight"], rotation[None], "linear")
        torch.testing.assert_close(folded[f"{name}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
