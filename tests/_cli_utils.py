"""Tiny local inputs for the CLI, diagnostics and example tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

OFT_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build_oft_inputs(
    root: Path, n: int = 3, *, block_size: int = 8, flags: list[bool] | None = None
) -> dict[str, Path]:
    """Save a tiny Llama base and ``n`` OFT adapters with random rotations under ``root``.

    ``flags[i]`` is adapter i's ``use_cayley_neumann`` (default: all True except adapter 1).
    """
    from conftest import build_tiny_llama
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    build_tiny_llama().save_pretrained(root / "base")
    flags = flags if flags is not None else [i != 1 for i in range(n)]
    paths = {"base": root / "base"}
    for i in range(n):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(root / "base"),
            OFTConfig(oft_block_size=block_size, r=0, target_modules=OFT_TARGETS, use_cayley_neumann=flags[i]),
        )
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "oft_R" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        model.save_pretrained(root / f"oft{i}")
        paths[f"oft{i}"] = root / f"oft{i}"
    return paths


def build_lora_and_full_inputs(root: Path, base: Path, n: int = 2) -> dict[str, Path]:
    """``n`` LoRA adapters (r=4 on q/v/down) and ``n`` full fine-tunes (base + noise) of ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i in range(n):
        gen = torch.Generator().manual_seed(200 + i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(root / f"lora{i}")
        full = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for param in full.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=gen))
        full.save_pretrained(root / f"ft{i}")
        paths[f"lora{i}"], paths[f"ft{i}"] = root / f"lora{i}", root / f"ft{i}"
    return paths
