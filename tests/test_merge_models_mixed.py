"""`merge_models` with full checkpoints and LoRA adapters in one merge.

A LoRA expert must act exactly as the checkpoint PEFT makes of it (`merge_and_unload`, saved in
float64 here so that no rounding separates the two), and the merge of the mix must equal the
independent dense float64 reference (`ref_merge`) on every weight. OFT experts: test_mixed_oft.py.
"""

from __future__ import annotations

import pytest
import torch
from _lora_utils import make_lora_adapter, perturbed_state, single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama
from safetensors.torch import load_file
from test_decouple_ops import ref_merge

from peft_orthomerge import IncompatibleInputsError, merge_models


def _base64():
    return build_tiny_llama().double()


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from peft import PeftModel

    root = tmp_path_factory.mktemp("mixed")
    _base64().save_pretrained(root / "base")
    full = _base64()
    full.load_state_dict(perturbed_state(_base64(), seed=31))
    full.save_pretrained(root / "full")
    make_lora_adapter(_base64, root / "lora", seed=32, r=4, target_modules=["q_proj", "k_proj", "down_proj"])
    folded = PeftModel.from_pretrained(_base64(), root / "lora").merge_and_unload()
    folded.save_pretrained(root / "lora_folded")
    return root


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_a_lora_expert_merges_as_the_checkpoint_peft_makes_of_it(mix, tmp_path, target):
    weights = [0.6, 0.4]
    merge_models(mix / "base", [mix / "full", mix / "lora"], tmp_path / "mixed", weights, target=target)
    merge_models(mix / "base", [mix / "full", mix / "lora_folded"], tmp_path / "folded", weights, target=target)
    mixed = load_file(tmp_path / "mixed" / "model.safetensors")
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    base = load_file(mix / "base" / "model.safetensors")
    experts = [load_file(mix / "full" / "model.safetensors"), load_file(mix / "lora_folded" / "model.safetensors")]
    for name, w0 in base.items():
        torch.testing.assert_close(mixed[name], folded[name], rtol=1e-12, atol=1e-12)
        if w0.dim() == 2:
            ref = ref_merge(w0, [e[name] for e in experts], weights, target)
            torch.testing.assert_close(mixed[name], ref, rtol=0, atol=1e-9)


def test_a_lora_adapter_of_another_base_is_refused(mix, tmp_path):
    make_lora_adapter(
        lambda: build_tiny_llama(num_hidden_layers=3),
        tmp_path / "deep",
        seed=34,
        target_modules=["q_proj"],
        layers_to_transform=[2],
    )
    with pytest.raises(IncompatibleInputsError, match="does not have"):
        merge_models(mix / "base", [tmp_path / "deep"], tmp_path / "out")
