"""Merge OFT adapters and fold the merged rotation into the base weights: a plain transformers model.

Builds a tiny Llama and two random OFT adapters locally (offline, seconds). The folded model is
written shard by shard from the base checkpoint, one tensor at a time, and loads with
`AutoModelForCausalLM.from_pretrained` without PEFT. It matches PEFT's own `merge_and_unload` of
the merged adapter.
"""

import tempfile
from pathlib import Path

import torch
from peft import OFTConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_orthomerge import merge_oft_checkpoints

CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)


def base_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def fake_finetuned_adapter(path: Path, seed: int) -> Path:
    base = base_model()
    torch.manual_seed(seed)  # after building the base, which seeds itself
    config = OFTConfig(
        r=0, oft_block_size=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_weights=False
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "oft_R" in name:
                param.mul_(0.3)
    model.save_pretrained(path)
    return path


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    base_model().save_pretrained(tmp / "base")
    adapters = [fake_finetuned_adapter(tmp / f"oft-{i}", seed=i) for i in range(2)]

    report = merge_oft_checkpoints(adapters, tmp / "merged-model", fold_into=tmp / "base")
    print(report)
    folded = AutoModelForCausalLM.from_pretrained(tmp / "merged-model").eval()

    # Cross-check against PEFT: merge to an adapter, then let PEFT fold it.
    merge_oft_checkpoints(adapters, tmp / "merged-oft")
    by_peft = PeftModel.from_pretrained(base_model(), tmp / "merged-oft").merge_and_unload()
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        diff = (folded(ids).logits - by_peft(ids).logits).abs().max()
    print(f"max |logit difference| folded vs PEFT merge_and_unload: {float(diff):.2e}")
