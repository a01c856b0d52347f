"""Device resolution and output casting (CPU only; CUDA cases in test_device_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from peft_orthomerge.device import (
    resolve_device,
    synchronize,
    to_output,
)
from peft_orthomerge.errors import ConfigError


def test_resolve_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(" AUTO ") == expected


@pytest.mark.parametrize("bad", ["gpu", "tpu:0", "cuda:x", ""])
def test_resolve_unknown(bad):
    with pytest.raises(ConfigError, match="device"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_unavailable_is_config_error(name):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(name)


def test_to_output_back_to_base_dtype():
    x = torch.randn(4, 5, dtype=torch.float64).t()
    y = to_output(x, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.device.type == "cpu" and y.is_contiguous()
    assert torch.equal(y, x.to(torch.bfloat16))
    synchronize("cpu")  # no-op, must not raise
