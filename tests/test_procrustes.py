"""Polar solvers: accuracy against the SVD, certificates, fallback, and why the quintic is not used."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)

from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops.closest_polar import closest_polar_eigh
from peft_orthomerge.ops.decouple import decouple_merge, decouple_merge_ta_rows
from peft_orthomerge.ops.orthogonality import orthogonality_errors
from peft_orthomerge.ops.procrustes import (
    eigh_tol,
    newton_schulz,
    polar,
    polar_by_eigh,
    quintic_newton_schulz,
    resolve_solver,
)


def _svd_polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a)
    return u @ vh


def _cross_gram(n: int, out: int, noise: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=gen, dtype=torch.float64) / out**0.5
    wt = w0 + noise * torch.randn(out, n, generator=gen, dtype=torch.float64) / out**0.5
    return w0.T @ wt


@pytest.mark.parametrize("solver", ["svd", "newton_schulz"])
def test_polar_matches_svd_reference_batched(solver):
    a = torch.stack([_cross_gram(48, 96, 0.3, s) for s in range(3)])
    res = polar(a, solver)
    ref = torch.stack([_svd_polar(x) for x in a])
    assert res.factor.shape == a.shape
    assert torch.allclose(res.factor, ref, atol=1e-10)
    assert res.orthogonality_error < 1e-11
    assert res.fallback == 0
    # the polar factor makes P^T A symmetric positive definite
    h = res.factor.transpose(-2, -1) @ a
    assert torch.allclose(h, h.transpose(-2, -1), atol=1e-9)
    assert bool((torch.linalg.eigvalsh(0.5 * (h + h.transpose(-2, -1))) > 0).all())


def test_newton_schulz_certificate_bounds_distance_to_polar():
    a = _cross_gram(32, 64, 0.5, 7)
    ref = _svd_polar(a)
    for steps in (3, 6, 12):
        x, err, taken = newton_schulz(a, tol=0.0, max_iter=steps)
        assert taken == steps
        # ||X - polar(A)||_F <= ||X^T X - I||_F (the certificate the solver reports)
        assert float(torch.linalg.matrix_norm(x - ref)) <= float(err) + 1e-12


def test_newton_schulz_falls_back_on_singular_and_ill_conditioned():
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    s_singular = torch.linspace(1, 2, 40, dtype=torch.float64)
    s_singular[-3:] = 0
    s_ill = torch.logspace(0, -9, 40, dtype=torch.float64)
    good = _cross_gram(40, 80, 0.2, 1)
    batch = torch.stack([u @ torch.diag(s_singular) @ v.T, u @ torch.diag(s_ill) @ v.T, good])
    res = polar(batch, "newton_schulz", max_iter=40)
    assert res.fallback == 2
    assert torch.allclose(res.factor[2], _svd_polar(good), atol=1e-10)
    assert torch.allclose(res.factor[1], u @ v.T, atol=1e-5)
    assert res.orthogonality_error < 1e-11


def test_published_quintic_does_not_converge_to_polar_factor():
    """The 5-step quintic (3.4445, -4.7750, 2.0315) leaves singular values far from 1."""
    a = _cross_gram(64, 256, 0.3, 11)
    x = quintic_newton_schulz(a, steps=5)
    s = torch.linalg.svdvals(x)
    assert float((s - 1).abs().max()) > 0.1
    # more steps do not help: it oscillates in a band instead of converging
    s_many = torch.linalg.svdvals(quintic_newton_schulz(a, steps=50))
    assert float((s_many - 1).abs().max()) > 0.1
    assert float(torch.linalg.matrix_norm(x - _svd_polar(a))) > 0.1
    # the convergent iteration on the same matrix
    ours = polar(a, "newton_schulz")
    assert ours.fallback == 0
    assert float((torch.linalg.svdvals(ours.factor) - 1).abs().max()) < 1e-12


def test_orthogonality_error_and_solver_names():
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    assert float(orthogonality_errors(q)) < 1e-13
    assert float(orthogonality_errors(2 * q)) == pytest.approx(3 * 10**0.5, rel=1e-9)
    assert resolve_solver("auto", "cpu") == "eigh"  # float64 math
    assert resolve_solver("auto", "cpu", torch.float32) == "svd"
    assert resolve_solver("auto", "cuda", torch.float64) == "newton_schulz"
    assert resolve_solver("newton_schulz", "cpu") == "newton_schulz"
    with pytest.raises(ConfigError):
        resolve_solver("quintic", "cpu")


# -- the eigh route: polar(A) from the eigendecomposition of A^T A, certified by orthogonality ----
def _conditioned(n: int, decades: float, seed: int, det_sign: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    if float(torch.linalg.det(u @ v.T)) * det_sign < 0:
        u[:, 0] = -u[:, 0]
    return (u * torch.logspace(0, -decades, n, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("decades", [0.5, 2.0, 3.0, 3.5])
def test_eigh_error_is_bounded_by_its_orthogonality_error(decades):
    a = _conditioned(96, decades, seed=int(10 * decades))
    p, err, _ = polar_by_eigh(a)
    exact = _svd_polar(a)
    distance = float((p - exact).norm())
    # first-order bound 0.71 * error (polar_by_eigh); the SVD's own rounding is far below it
    assert distance <= 0.75 * float(err) + 1e-13
    certified = polar(a, "eigh")
    assert certified.fallback == int(not float(err) <= eigh_tol(torch.float64))
    assert float((certified.factor - exact).norm()) <= 1e-9


def test_eigh_falls_back_on_singular_input_and_auto_uses_it_in_float64():
    a = _conditioned(32, 2.0, seed=1)
    a[:, 0] = a[:, 1]  # singular
    res = polar(a[None].repeat(2, 1, 1), "eigh")
    assert res.fallback == 2 and res.solver == "eigh"
    assert torch.allclose(res.factor[0], _svd_polar(a), atol=1e-12)
    good = _conditioned(32, 1.0, seed=2)
    assert polar(good).fallback == 0 and polar(good).solver == "eigh"
    assert polar(good.float()).solver == "svd"


@pytest.mark.parametrize("det_sign", [1.0, -1.0])
def test_closest_polar_eigh_matches_svd_in_so_n(det_sign):
    m = _conditioned(48, 1.5, seed=3, det_sign=det_sign)
    p, err = closest_polar_eigh(m)
    u, _, vh = torch.linalg.svd(m)
    if float(torch.linalg.det(u @ vh)) < 0:  # Kabsch: flip the weakest direction
        u[:, -1] = -u[:, -1]
    ref = u @ vh
    assert p is not None and err < 1e-9
    assert float(torch.linalg.det(p)) == pytest.approx(1.0, abs=1e-9)
    assert float((p - ref).norm()) < 1e-9
    singular = m.clone()
    singular[:, 0] = 0
    assert closest_polar_eigh(singular)[0] is None


@pytest.mark.parametrize("shape", [(96, 64), (64, 64), (40, 64), (24, 64)])  # rows, rows, rows (out < in), reduced
def test_decoupling_with_eigh_matches_the_svd(shape):
    gen = torch.Generator().manual_seed(4)
    w0 = _conditioned(max(shape), 1.5, seed=5)[: shape[0], : shape[1]].contiguous()
    experts = [w0 + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    for target in ("global", "conflict"):
        for residual in ("ta", "ties"):
            got, stats = decouple_merge(w0, experts, [1 / 3] * 3, target, residual, solver="eigh")
            ref, _ = decouple_merge(w0, experts, [1 / 3] * 3, target, residual, solver="svd")
            assert float((got - ref).norm() / ref.norm()) < 1e-10, (target, residual)
            rows, _ = (
                decouple_merge_ta_rows(w0, experts, [1 / 3] * 3, target)
                if residual == "ta" and 2 * shape[0] >= shape[1]
                else (got, None)
            )
            assert float((rows - ref).norm() / ref.norm()) < 1e-10, (target, residual)


def test_eigh_that_does_not_converge_falls_back_to_the_svd(monkeypatch):
    a = _conditioned(16, 1.0, seed=7)

    def fail(_x):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    res = polar(a, "eigh")
    assert res.fallback == 1 and torch.allclose(res.factor, _svd_polar(a), atol=1e-12)
    assert closest_polar_eigh(a)[0] is None
