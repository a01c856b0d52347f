"""`ops.precision`: ``precision="float32"`` decouples a weight in float32 only where its error
estimate allows, in float64 elsewhere (an ill-conditioned weight in float32 was 2% off on SmolLM2)."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import perturbed_state, single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama
from safetensors.torch import load_file

from peft_orthomerge import MergeReport, merge_models
from peft_orthomerge.ops.decouple import TensorRows
from peft_orthomerge.ops.precision import (
    FLOAT32_TOL,
    base_condition,
    decoupling_dtype,
    float32_error_estimate,
    rows_condition,
)

ILL = "model.layers.0.self_attn.q_proj.weight"  # made ill-conditioned below
WELL = "model.layers.0.mlp.gate_proj.weight"


def _with_spectrum(shape, decades: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -decades, r, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(48, 32), (32, 32), (16, 64)])
def test_condition_numbers_are_those_of_the_svd(shape):
    w = _with_spectrum(shape, 3.0, 0).float()
    s = torch.linalg.svdvals(w.double())
    want = float(s[0] / s[-1])
    assert base_condition(w) == pytest.approx(want, rel=1e-6)
    if shape[0] >= shape[1]:  # the row-block form exists for out >= in
        assert rows_condition(TensorRows(w)) == pytest.approx(want, rel=1e-6)
    singular = w.clone()
    singular[0] = 0  # a zero row (out < in) or a null column direction (out >= in, via the Gram's lambda_min)
    if shape[0] < shape[1]:
        assert base_condition(singular) == float("inf") or base_condition(singular) > 1e6
    singular = w.clone()
    singular[:, 0] = singular[:, 1]  # two equal columns: W0 has a null space
    if shape[0] >= shape[1]:
        assert base_condition(singular) > 1e6


def test_decoupling_dtype():
    calls = []

    def kappa(value):
        return lambda: calls.append(value) or value

    assert decoupling_dtype(torch.float64, kappa(1e9)) == (torch.float64, None) and not calls  # never asked
    assert decoupling_dtype(torch.float32, None) == (torch.float32, None)
    dtype, estimate = decoupling_dtype(torch.float32, kappa(31.6))
    assert dtype == torch.float32 and estimate == float32_error_estimate(31.6) <= FLOAT32_TOL
    dtype, estimate = decoupling_dtype(torch.float32, kappa(5e4))
    assert dtype == torch.float64 and estimate > FLOAT32_TOL
    assert decoupling_dtype(torch.float32, kappa(float("inf")))[0] == torch.float64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama whose layer-0 q_proj has singular values over 5 decades (kappa 1e5), and 3
    fine-tunes of it."""
    root = tmp_path_factory.mktemp("precision")
    model = build_tiny_llama()
    state = model.state_dict()
    state[ILL] = _with_spectrum(tuple(state[ILL].shape), 5.0, 1).float() * float(state[ILL].norm())
    model.load_state_dict(state)
    model.save_pretrained(root / "base")
    experts = []
    for seed in (1, 2, 3):
        expert = build_tiny_llama()
        expert.load_state_dict(perturbed_state(model, seed))
        expert.save_pretrained(root / f"e{seed}")
        experts.append(root / f"e{seed}")
    return root / "base", experts


def test_float32_merge_takes_float64_for_the_ill_conditioned_weight(checkpoints, tmp_path):
    base, experts = checkpoints
    assert base_condition(load_file(base / "model.safetensors")[ILL]) > 1e4
    for residual in ("ta", "ties"):  # the row-block driver and the dense one
        reports = {}
        outs = {}
        for precision in ("float64", "float32"):
            out = tmp_path / f"{residual}-{precision}"
            reports[precision] = merge_models(base, experts, out, residual=residual, precision=precision)
            outs[precision] = load_file(out / "model.safetensors")
        entries = {m.name: m for m in reports["float32"].modules}
        assert entries[ILL].extra["float32_error_estimate"] > FLOAT32_TOL
        assert entries[WELL].extra["float32_error_estimate"] <= FLOAT32_TOL
        assert "float32_error_estimate" not in {m.name: m for m in reports["float64"].modules}[ILL].extra
        # the ill-conditioned weight was computed in float64: the float64 merge's bits
        assert torch.equal(outs["float32"][ILL], outs["float64"][ILL])
        # the well-conditioned one in float32: close to float64, not the same bits
        ref, got = outs["float64"][WELL].double(), outs["float32"][WELL].double()
        assert 0 < float((got - ref).norm() / ref.norm()) < 1e-4
        written = MergeReport.from_json(tmp_path / f"{residual}-float32" / "orthomerge_report.json")
        assert {m.name: m for m in written.modules}[ILL].extra["float32_error_estimate"] > FLOAT32_TOL
