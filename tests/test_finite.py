"""`ops.finite.all_finite` (one reduction) agrees with ``torch.isfinite(x).all()`` on every dtype and value."""

from __future__ import annotations

import pytest
import torch

from peft_orthomerge.ops.finite import all_finite

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_matches_isfinite(dtype, bad, where):
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    if bad is not None:
        x.view(-1)[where] = bad
    assert all_finite(x) == bool(torch.isfinite(x).all()) == (bad is None)


def test_nan_next_to_inf_and_extreme_finite_values():
    x = torch.tensor(
        [torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny]
    )
    assert all_finite(x)
    x[1] = float("nan")
    assert not all_finite(x)
    assert not all_finite(torch.tensor([float("inf"), float("nan")]))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_float8_is_upcast():
    x = torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn)
    assert all_finite(x)
    x = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert not all_finite(x)


def test_complex_integer_boolean_and_empty():
    assert all_finite(torch.tensor([1 + 2j]))
    assert not all_finite(torch.tensor([complex(1, float("inf"))]))
    assert all_finite(torch.arange(5)) and all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.empty(0, 4))
