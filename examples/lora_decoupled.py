"""Merge two LoRA adapters by orthogonal-residual decoupling (OrthoMerge-G and -C) on a tiny Llama.

Builds a tiny Llama (GQA, intermediate > hidden) and two random LoRA adapters with different
ranks and target modules, locally and offline (seconds). Then:

1. ``target="global"`` with TA residuals: merged weights in place in the transformers model;
2. ``target="conflict"`` with TIES residuals;
3. ``target=None``: the plain Euclidean baseline (task arithmetic on the folded deltas);
4. ``export="lora"``: the merged deltas as a rank-16 LoRA adapter (a `PeftModel`), with the
   truncated-SVD approximation error in the report.
"""

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_orthomerge import merge_lora_adapters

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


def fake_finetuned_lora(path: Path, seed: int, **config) -> Path:
    model = get_peft_model(base_model(), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to say
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(path)
    return path


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        a = fake_finetuned_lora(
            Path(tmp) / "math", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        )
        b = fake_finetuned_lora(
            Path(tmp) / "code", 2, r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "v_proj", "up_proj"]
        )
        ids = torch.tensor([[1, 7, 42, 3, 99, 5]])

        merged = merge_lora_adapters(base_model(), [a, b], [0.5, 0.5], target="global", residual="ta")
        print(merged.orthomerge_report)
        conflict = merge_lora_adapters(base_model(), [a, b], target="conflict", residual="ties")
        plain = merge_lora_adapters(base_model(), [a, b], target=None)
        with torch.no_grad():
            logits = {
                name: m(ids).logits
                for name, m in [("global+ta", merged), ("conflict+ties", conflict), ("euclidean ta", plain)]
            }
        for name, value in logits.items():
            print(f"{name:>14}: logits norm {float(value.norm()):.4f}")

        adapter = merge_lora_adapters(base_model(), [a, b], export="lora", rank=16)
        print(type(adapter).__name__, adapter.orthomerge_report.warnings[-1])
        with torch.no_grad():
            gap = float((adapter(ids).logits - logits["global+ta"]).abs().max())
        print(f"rank-16 LoRA export vs merged model: max logit difference {gap:.2e}")


if __name__ == "__main__":
    main()
