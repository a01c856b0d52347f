"""Merge three OFT adapters into one PEFT OFT adapter, from the files alone, then load it with PEFT.

Everything is built locally in a temporary directory (a tiny Llama and three random OFT adapters
standing in for fine-tuned ones); runs in seconds, offline. Replace the paths with your own
adapter directories or Hub ids.
"""

import tempfile
from pathlib import Path

import torch
from peft import OFTConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

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


def fake_finetuned_adapter(path: Path, seed: int, use_cayley_neumann: bool) -> Path:
    base = base_model()
    torch.manual_seed(seed)  # after building the base, which seeds itself
    config = OFTConfig(
        r=0,
        oft_block_size=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_weights=False,
        use_cayley_neumann=use_cayley_neumann,
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
    adapters = [fake_finetuned_adapter(tmp / f"oft-{i}", seed=i, use_cayley_neumann=i != 2) for i in range(3)]

    # Tensor by tensor, no model built. The third adapter uses the other Cayley convention:
    # the inputs are brought to one convention and the output uses the exact map (see report.warnings).
    report = merge_oft_checkpoints(adapters, tmp / "merged-oft", weights=[2, 1, 1])
    print(report)
    print("files:", sorted(p.name for p in (tmp / "merged-oft").iterdir()))

    # The result is an ordinary PEFT OFT adapter.
    model = PeftModel.from_pretrained(base_model(), tmp / "merged-oft")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        print("logits of the merged model:", model(ids).logits.shape)
