"""`ops.lapack`: torch's SVD and eigendecomposition where they converge, the float64 ones where
LAPACK's float32 ones do not, and an error naming the tensor where neither does."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)
from test_merge_models import experts  # noqa: F401  (module fixture: a tiny Llama base and 3 fine-tunes)

from peft_orthomerge import merge_models
from peft_orthomerge.errors import NumericalError
from peft_orthomerge.ops.closest_polar import rank_rtol, thin_closest_polar_svd
from peft_orthomerge.ops.decouple import decouple_merge, decoupling_path
from peft_orthomerge.ops.lapack import eigh, svd

TORCH_SVD = torch.linalg.svd


def _complement_block(out: int, n: int, noise: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``U_2^T V_2`` for the complements of the rows of a weight and of a nearby one: a block of an
    orthogonal matrix, singular values clustered at 1 (what the decoupling's thin route factors)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=gen, dtype=torch.float64)
    w1 = w0 + noise * torch.randn(out, n, generator=gen, dtype=torch.float64)
    u2 = torch.linalg.qr(w0.T, mode="complete").Q[:, out:]
    v2 = torch.linalg.qr(w1.T, mode="complete").Q[:, out:]
    return (u2.T @ v2).to(dtype)


def _spectrum_weight(out: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A float32 weight with singular values log-spaced over 1.5 decades (as `benchmarks/bench_decouple.py`
    builds them: the same draws give the same matrices)."""
    r = min(out, n)
    u = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    return (u * torch.logspace(0, -1.5, r)) @ v.T


def _float32_fails(monkeypatch) -> list[torch.dtype]:
    """Make every float32 SVD fail as LAPACK's can; returns the dtypes of the calls that failed."""
    failed: list[torch.dtype] = []

    def flaky(x, *args, **kwargs):
        if x.dtype == torch.float32:
            failed.append(x.dtype)
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")
        return TORCH_SVD(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    return failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("full", [True, False])
def test_equals_torch_where_it_converges(dtype, full):
    x = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for got, want in zip(svd(x, full_matrices=full), TORCH_SVD(x, full_matrices=full)):
        assert got.dtype == dtype and torch.equal(got, want)


def test_a_failed_float32_svd_is_the_float64_one(monkeypatch):
    x = _complement_block(24, 64, 0.05, 1)
    failed = _float32_fails(monkeypatch)
    u, s, vh = svd(x)
    assert failed == [torch.float32]
    want = TORCH_SVD(x.double())
    for got, ref in zip((u, s, vh), want):
        assert got.dtype == torch.float32 and torch.equal(got, ref.float())
    assert torch.allclose((u * s) @ vh, x, atol=1e-6)  # a factorization of x, to float32 rounding
    assert float(s.max()) == pytest.approx(1.0, abs=1e-6)  # clustered at 1, as the docstring says


def test_a_failed_float32_eigh_is_the_float64_one(monkeypatch):
    a = torch.randn(9, 9, generator=torch.Generator().manual_seed(2))
    x = a @ a.T
    torch_eigh = torch.linalg.eigh
    assert all(torch.equal(g, w) for g, w in zip(eigh(x), torch_eigh(x)))  # as torch's where it converges

    def flaky(m, *args, **kwargs):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return torch_eigh(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    evals, evecs = eigh(x)
    want = torch_eigh(x.double())
    assert evals.dtype == evecs.dtype == torch.float32
    assert torch.equal(evals, want[0].float()) and torch.equal(evecs, want[1].float())
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: flaky(m.float()))
    with pytest.raises(NumericalError, match=r"eigendecomposition of a \(9, 9\) matrix did not converge"):
        eigh(x)


def test_no_convergence_in_float64_is_a_numerical_error(monkeypatch):
    def never(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")

    monkeypatch.setattr(torch.linalg, "svd", never)
    with pytest.raises(NumericalError, match=r"\(5, 5\) matrix did not converge, even in float64") as info:
        svd(torch.eye(5, dtype=torch.float32))
    assert info.value.tensor is None and "extreme values" in str(info.value)


@pytest.mark.parametrize(
    "shape", [(40, 64), (32, 64), (16, 64)]
)  # thin SVD route; reduced basis (2 out = in, 2 out < in)
def test_float32_decoupling_survives_failed_svds(monkeypatch, shape):
    """Every float32 SVD of a float32 merge fails: the merge still completes, with the float64 SVDs'
    factors, within float32 accuracy of the float64 merge."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[1] ** 0.5
    experts_ = [
        w0 + 0.05 * torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[1] ** 0.5 for _ in range(3)
    ]
    weights = [0.5, 0.3, 0.2]
    want, _ = decouple_merge(w0, experts_, weights, residual="ties")
    failed = _float32_fails(monkeypatch)
    got, _ = decouple_merge(w0.float(), [e.float() for e in experts_], weights, residual="ties", dtype=torch.float32)
    assert failed  # the retry ran
    assert float(torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want)) < 1e-5


def test_the_complement_block_where_onemkl_failed():
    """The benchmark's 512 x 1024 weight and 5 experts: oneMKL's float32 ``gesdd`` (torch 2.13 CPU
    wheel) does not converge on the complement block of expert 1 in the thin route, which used to
    end the merge in torch's ``LinAlgError``. Every expert's float32 rotation is now within float32
    accuracy of its float64 one, the retried one like the others. (With another LAPACK the SVD may
    converge at once: the agreement is checked either way.)"""
    gen = torch.Generator().manual_seed(0)
    w0 = _spectrum_weight(512, 1024, gen)
    rms = w0.pow(2).mean().sqrt()
    for expert in [w0 + 0.05 * rms * torch.randn(w0.shape, generator=gen) for _ in range(5)]:
        p32 = thin_closest_polar_svd(w0, expert, rank_rtol(torch.float32))
        p64 = thin_closest_polar_svd(w0.double(), expert.double(), rank_rtol(torch.float64))
        assert float(torch.linalg.matrix_norm(p32.double() - p64)) < 2e-4  # measured 9.0e-5 to 9.7e-5


def test_two_out_equal_to_in_takes_the_reduced_basis():
    assert decoupling_path((32, 64), "global", "ta") == "reduced"
    assert decoupling_path((33, 64), "global", "ta") == "dense"
    assert decoupling_path((32, 64), "global", "ties") == "dense"


def test_merge_models_names_the_tensor_whose_svd_failed(monkeypatch, experts, tmp_path):  # noqa: F811
    base, paths = experts

    def never(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")

    monkeypatch.setattr(torch.linalg, "svd", never)
    out = tmp_path / "merged"
    with pytest.raises(NumericalError, match="did not converge, even in float64") as info:
        merge_models(base, paths, out, target="global", residual="tsvm")
    assert info.value.tensor is not None and info.value.tensor in str(info.value)
    assert info.value.tensor.endswith(".weight")
    assert not out.exists()
