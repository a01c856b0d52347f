"""Shared fixtures: tiny models built from configs (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and oversubscribe CI's 2 cores)


def tiny_llama_config(**overrides):
    """A Llama with GQA (k/v narrower than the input) and intermediate > hidden."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    return model


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny Llama saved with `save_pretrained` (safetensors); read-only for tests."""
    path = tmp_path_factory.mktemp("tiny_base")
    build_tiny_llama().save_pretrained(path)
    return path
