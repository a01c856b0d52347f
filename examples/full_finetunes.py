"""Merge full fine-tuned checkpoints with `merge_models` (streamed, tensor by tensor).

Builds a tiny Llama base and three "fine-tunes" (the base plus noise), saved as safetensors,
locally and offline (seconds). Merges them with conflict-aware decoupling and DARE-TIES
residuals, reloads the result with `AutoModelForCausalLM.from_pretrained`, and prints the report.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_orthomerge import merge_models

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


def fake_finetune(path: Path, seed: int, against: int | None = None) -> Path:
    """The base plus noise; with ``against``, mostly the opposite of that expert's update (a conflict)."""
    model = base_model()
    gen = torch.Generator().manual_seed(seed)
    other = torch.Generator().manual_seed(against) if against is not None else None
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            if other is not None:
                noise = 0.5 * noise - torch.randn(param.shape, generator=other)
            param.add_(0.01 * param.std() * noise)
    model.save_pretrained(path)
    return path


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_model().save_pretrained(root / "base")
        experts = [
            fake_finetune(root / "expert1", 1),
            fake_finetune(root / "expert2", 2),
            fake_finetune(root / "expert3", 3, against=1),
        ]
        report = merge_models(
            root / "base",
            experts,
            root / "merged",
            weights=[0.5, 0.3, 0.2],
            target="conflict",
            residual="dare_ties",
            residual_kwargs={"p": 0.3, "seed": 7},
        )
        print(report)
        merged = AutoModelForCausalLM.from_pretrained(root / "merged")
        print("output files:", sorted(p.name for p in (root / "merged").iterdir()))
        stats = report.modules[0]
        print(
            f"{stats.name}: conflicting rows kept per expert", [int(stats.extra[f"rows_kept_{i}"]) for i in range(3)]
        )
        print(
            "  task vector norms",
            [round(stats.extra[f"task_vector_norm_{i}"], 4) for i in range(3)],
            "orthogonal part norms",
            [round(stats.extra[f"orth_part_norm_{i}"], 4) for i in range(3)],
            "residual norms",
            [round(stats.extra[f"residual_norm_{i}"], 4) for i in range(3)],
        )
        with torch.no_grad():
            print("logits of the merged model:", merged(torch.tensor([[1, 2, 3]])).logits.shape)


if __name__ == "__main__":
    main()
