"""The SmolLM2 replica's training resumes exactly: an adapter interrupted after a checkpoint and
resumed equals one trained without interruption (2 layers of the real model, 2 steps)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.real_model import RegistryUnavailable, smollm2_dir


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_adapter(tmp_path):
    from benchmarks.quality_smollm2.train import TrainConfig, train_adapter

    try:
        base = smollm2_dir(num_hidden_layers=2)
    except RegistryUnavailable as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")
    torch.set_num_threads(1)
    cfg = dataclasses.replace(
        TrainConfig(),
        layers=2,
        tasks=("add",),
        kinds=("oft",),
        train_examples=8,
        steps=3,
        batch=4,
        save_every=1,
        log_every=1,  # the progress message is the interruption point
    )

    def stop_at_two(message: str) -> None:
        if "step 2/" in message:
            raise Interrupted(message)

    with pytest.raises(Interrupted):
        train_adapter("oft", "add", cfg, base, tmp_path / "resumed", say=stop_at_two)
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "done.json").exists()
    resumed = train_adapter("oft", "add", cfg, base, tmp_path / "resumed", say=lambda m: None)
    straight = train_adapter("oft", "add", cfg, base, tmp_path / "straight", say=lambda m: None)
    a, b = load_file(resumed / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert set(a) == set(b) and a
    assert max(float(v.abs().max()) for v in a.values()) > 0  # training moved the adapter
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7, rtol=0), key
    assert train_adapter("oft", "add", cfg, base, tmp_path / "resumed", say=None) == resumed  # finished: skipped
