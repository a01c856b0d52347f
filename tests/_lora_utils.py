"""Helpers for LoRA / full fine-tune tests: random non-trivial adapters and experts on tiny models."""

from __future__ import annotations

import pytest
import torch


def randomize_lora(peft_model, seed: int, scale: float = 0.05) -> None:
    """Give every LoRA A/B (and DoRA magnitude) of ``peft_model`` random values (B is zero at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
                if "magnitude" in name:
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.copy_(scale * noise)


def make_lora_adapter(base_factory, out_dir, seed: int, **config_kwargs):
    """Build a fresh base, attach a LoRA adapter with ``config_kwargs``, randomise and save it."""
    from peft import LoraConfig, get_peft_model

    model = base_factory()
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config_kwargs})
    peft_model = get_peft_model(model, config)
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return peft_model


def perturbed_state(model, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A fine-tuned copy of ``model``'s state dict: every floating tensor plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
            out[name] = t + scale * noise * t.float().std().clamp_min(1e-3).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small LAPACK calls are much faster on one thread on a shared, busy CPU; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
