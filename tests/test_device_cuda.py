"""CUDA runs agree with CPU runs. Skipped without a GPU (the suite passes without one)."""

from __future__ import annotations

import pytest
import torch

from peft_orthomerge.device import resolve_device, to_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_resolve_cuda():
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_round_trip_through_cuda_keeps_values_and_dtype():
    x = torch.randn(64, 48, dtype=torch.bfloat16)
    y = x.to(resolve_device("cuda"), torch.float32)
    assert y.device.type == "cuda" and y.dtype == torch.float32
    back = to_output(y, x.dtype)
    assert back.device.type == "cpu" and back.dtype == torch.bfloat16 and torch.equal(back, x)


def _all_tensors(directory, stem):
    from peft_orthomerge.sources.tensors import TensorReader

    reader = TensorReader.from_dir(directory, stem)
    return {k: reader.get(k) for k in reader.keys()}


def _assert_close_trees(cpu_dir, cuda_dir, stem, rtol=1e-5, atol=1e-6):
    a, b = _all_tensors(cpu_dir, stem), _all_tensors(cuda_dir, stem)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].device.type == "cpu", name
        torch.testing.assert_close(b[name].double(), a[name].double(), rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def oft_inputs(tmp_path_factory):
    from _cli_utils import build_oft_inputs

    return build_oft_inputs(tmp_path_factory.mktemp("cuda_oft"), n=3)


@pytest.mark.parametrize("fold", [False, True])
def test_oft_checkpoints_cuda_matches_cpu(tmp_path, oft_inputs, fold):
    from peft_orthomerge import merge_oft_checkpoints

    adapters = [oft_inputs["oft0"], oft_inputs["oft1"], oft_inputs["oft2"]]
    kwargs = dict(weights=[2.0, 1.0, 1.0], fold_into=oft_inputs["base"] if fold else None)
    cpu = merge_oft_checkpoints(adapters, tmp_path / "cpu", device="cpu", **kwargs)
    gpu = merge_oft_checkpoints(adapters, tmp_path / "cuda", device="cuda", **kwargs)
    _assert_close_trees(tmp_path / "cpu", tmp_path / "cuda", "model" if fold else "adapter_model")
    for m_cpu, m_gpu in zip(cpu.modules, gpu.modules):
        assert m_cpu.name == m_gpu.name
        assert m_gpu.magnitude_factor == pytest.approx(m_cpu.magnitude_factor, rel=1e-9)


@pytest.fixture(scope="module")
def full_inputs(tmp_path_factory):
    from conftest import build_tiny_llama

    root = tmp_path_factory.mktemp("cuda_full")
    build_tiny_llama().to(torch.bfloat16).save_pretrained(root / "base")
    for i in range(2):
        model = build_tiny_llama().to(torch.bfloat16)
        gen = torch.Generator().manual_seed(400 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((0.02 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        model.save_pretrained(root / f"ft{i}")
    return root


@pytest.mark.parametrize("target, solver", [("global", "svd"), ("conflict", "auto"), (None, "auto")])
def test_merge_models_cuda_matches_cpu(tmp_path, full_inputs, target, solver):
    from peft_orthomerge import merge_models

    experts = [full_inputs / "ft0", full_inputs / "ft1"]
    kwargs = dict(weights=[0.7, 0.3], target=target, solver=solver)
    merge_models(full_inputs / "base", experts, tmp_path / "cpu", device="cpu", **kwargs)
    report = merge_models(full_inputs / "base", experts, tmp_path / "cuda", device="cuda", **kwargs)
    assert report.params["device"] == "cuda:0"
    # bf16 outputs: allow one bf16 ulp where float64 CPU and GPU results round differently
    _assert_close_trees(tmp_path / "cpu", tmp_path / "cuda", "model", rtol=8e-3, atol=1e-4)
