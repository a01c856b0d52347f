"""Karcher mean on SO(b): logarithm, defining property, closed forms, invariances, errors.

Expected values come from formulas coded here independently of the module: planar rotations,
Rodrigues' formula and the SO(3) log for closed forms, and an eigendecomposition-based log.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, NumericalError
from peft_orthomerge.ops.karcher import angle_over_sin, exp_so, karcher_mean, karcher_merge_skew, log_so

F64 = torch.float64


def rand_skew(*shape: int, gen: torch.Generator, max_angle: float | None = None) -> torch.Tensor:
    x = torch.randn(*shape, dtype=F64, generator=gen)
    a = x - x.mT
    if max_angle is not None:  # rescale each block so that its largest planar angle is max_angle * U(0.2, 1)
        radius = torch.linalg.eigvalsh(-(a @ a)).amax(dim=-1).sqrt()
        u = 0.2 + 0.8 * torch.rand(radius.shape, dtype=F64, generator=gen)
        a = a * (max_angle * u / radius)[..., None, None]
    return a


def rot2(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def hat(v: torch.Tensor) -> torch.Tensor:
    x, y, z = v.tolist()
    return torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=F64)


def rodrigues(axis: torch.Tensor, theta: float) -> torch.Tensor:
    k = hat(axis / axis.norm())
    return torch.eye(3, dtype=F64) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def so3_log(r: torch.Tensor) -> torch.Tensor:
    theta = math.acos(max(-1.0, min(1.0, (float(torch.trace(r)) - 1) / 2)))
    if theta == 0.0:
        return torch.zeros(3, 3, dtype=F64)
    return theta / (2 * math.sin(theta)) * (r - r.T)


def so3_exp(a: torch.Tensor) -> torch.Tensor:
    v = torch.tensor([a[2, 1], a[0, 2], a[1, 0]], dtype=F64)
    theta = float(v.norm())
    return torch.eye(3, dtype=F64) if theta == 0.0 else rodrigues(v, theta)


def eig_log(r: torch.Tensor) -> torch.Tensor:
    """Log via the complex eigendecomposition; valid for rotations with distinct eigenvalues."""
    lam, vecs = torch.linalg.eig(r)
    out = vecs @ torch.diag_embed(torch.log(lam)) @ torch.linalg.inv(vecs)
    return out.real


def random_weights(n: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.rand(n, dtype=F64, generator=gen) + 0.1
    return w / w.sum()


# ---------------------------------------------------------------- log / exp


@pytest.mark.parametrize("b", [2, 3, 4, 5, 16, 33, 64])
def test_log_inverts_exp_below_pi(b: int) -> None:
    gen = torch.Generator().manual_seed(b)
    a = rand_skew(12, b, b, gen=gen, max_angle=3.0)
    out = log_so(exp_so(a))
    torch.testing.assert_close(out, a, rtol=0, atol=1e-10)
    torch.testing.assert_close(out, -out.mT, rtol=0, atol=0)


def test_log_repeated_angles_tiny_angles_and_identity() -> None:
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=F64, generator=gen))
    blocks = torch.zeros(7, 7, dtype=F64)
    for i, theta in ((0, 1.3), (2, 1.3), (4, -1.3)):  # one angle three times, plus a fixed axis
        blocks[i, i + 1], blocks[i + 1, i] = -theta, theta
    a = q @ blocks @ q.T
    torch.testing.assert_close(log_so(exp_so(a)), a, rtol=0, atol=1e-12)
    tiny = rand_skew(4, 9, 9, gen=gen) * 1e-9
    torch.testing.assert_close(log_so(exp_so(tiny)), tiny, rtol=1e-6, atol=1e-22)
    assert torch.equal(log_so(torch.eye(6, dtype=F64)), torch.zeros(6, 6, dtype=F64))


def test_log_matches_so3_closed_form_and_eig_log() -> None:
    gen = torch.Generator().manual_seed(2)
    for theta in (1e-4, 0.5, 2.0, 3.1):
        axis = torch.randn(3, dtype=F64, generator=gen)
        r = rodrigues(axis, theta)
        torch.testing.assert_close(log_so(r), so3_log(r), rtol=0, atol=1e-11)
    r = exp_so(rand_skew(5, 6, 6, gen=gen, max_angle=2.5))
    torch.testing.assert_close(log_so(r), torch.stack([eig_log(x) for x in r]), rtol=0, atol=1e-10)


def test_angle_over_sin_against_direct_formula() -> None:
    theta = torch.cat([torch.logspace(-8, 0, 40, dtype=F64), torch.linspace(1.0, 3.0, 40, dtype=F64)])
    expected = theta / torch.sin(theta)
    torch.testing.assert_close(angle_over_sin(torch.cos(theta)), expected, rtol=1e-12, atol=0)
    assert float(angle_over_sin(torch.tensor([1.0], dtype=F64))) == 1.0
    assert math.isinf(float(angle_over_sin(torch.tensor([-1.0], dtype=F64))))


def test_log_refuses_outside_its_domain() -> None:
    with pytest.raises(NumericalError, match="angle of pi"):
        log_so(torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64)))  # rotation by pi
    with pytest.raises(NumericalError, match="reflection"):
        log_so(torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64)))
    with pytest.raises(NumericalError, match="block 1 is not orthogonal"):
        log_so(torch.stack([torch.eye(3, dtype=F64), torch.eye(3, dtype=F64) * 1.01]))
    with pytest.raises(NumericalError, match="non-finite"):
        log_so(torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(IncompatibleInputsError):
        log_so(torch.zeros(3, 4, dtype=F64))


# ---------------------------------------------------------------- Karcher mean


def test_defining_property_with_independent_log() -> None:
    gen = torch.Generator().manual_seed(3)
    n, k, b = 5, 4, 8
    rots = exp_so(rand_skew(n, k, b, b, gen=gen, max_angle=0.8))
    w = random_weights(n, gen)
    m = karcher_mean(rots, w)
    assert m.shape == (k, b, b) and m.dtype == F64
    torch.testing.assert_close(m.mT @ m, torch.eye(b, dtype=F64).expand(k, b, b), rtol=0, atol=1e-13)
    assert torch.all(torch.linalg.det(m) > 0)
    for blk in range(k):
        total = sum(w[i] * eig_log(m[blk].T @ rots[i, blk]) for i in range(n))
        assert float(total.abs().max()) < 1e-10


def test_so2_mean_is_weighted_mean_angle() -> None:
    gen = torch.Generator().manual_seed(4)
    n, k = 4, 3
    angles = (torch.rand(n, k, dtype=F64, generator=gen) - 0.5) * 2.4  # in (-1.2, 1.2)
    rots = torch.stack([torch.stack([rot2(float(a)) for a in row]) for row in angles])
    w = random_weights(n, gen)
    m = karcher_mean(rots, w)
    expected = torch.stack([rot2(float(a)) for a in (w[:, None] * angles).sum(0)])
    torch.testing.assert_close(m, expected, rtol=0, atol=1e-13)


def test_so3_same_axis_is_weighted_mean_angle() -> None:
    gen = torch.Generator().manual_seed(5)
    axis = torch.randn(3, dtype=F64, generator=gen)
    angles = [0.3, -0.9, 1.4]
    w = random_weights(3, gen)
    rots = torch.stack([rodrigues(axis, t) for t in angles])
    expected = rodrigues(axis, float(sum(wi * t for wi, t in zip(w.tolist(), angles))))
    torch.testing.assert_close(karcher_mean(rots, w), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("w2", [0.5, 0.2, 0.85])
def test_so3_two_rotations_give_the_geodesic_point(w2: float) -> None:
    gen = torch.Generator().manual_seed(6)
    r1 = rodrigues(torch.randn(3, dtype=F64, generator=gen), 1.1)
    r2 = rodrigues(torch.randn(3, dtype=F64, generator=gen), 0.7)
    expected = r1 @ so3_exp(w2 * so3_log(r1.T @ r2))  # exp(log(R1^T R2) / 2) from R1 at w2 = 1/2
    m = karcher_mean(torch.stack([r1, r2]), [1 - w2, w2])
    torch.testing.assert_close(m, expected, rtol=0, atol=1e-12)


def test_copies_return_the_input_and_one_input() -> None:
    gen = torch.Generator().manual_seed(7)
    r = exp_so(rand_skew(3, 6, 6, gen=gen, max_angle=2.0))
    torch.testing.assert_close(karcher_mean(r.expand(4, 3, 6, 6), [0.1, 0.2, 0.3, 0.4]), r, rtol=0, atol=1e-13)
    torch.testing.assert_close(karcher_mean(r[None]), r, rtol=0, atol=1e-13)


def test_order_independence() -> None:
    gen = torch.Generator().manual_seed(8)
    rots = exp_so(rand_skew(5, 2, 7, 7, gen=gen, max_angle=1.0))
    w = random_weights(5, gen)
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(karcher_mean(rots[perm], w[perm]), karcher_mean(rots, w), rtol=0, atol=1e-13)


def test_bi_invariance() -> None:
    gen = torch.Generator().manual_seed(9)
    rots = exp_so(rand_skew(4, 3, 5, 5, gen=gen, max_angle=0.9))
    g = exp_so(rand_skew(3, 5, 5, gen=gen, max_angle=2.5))
    h = exp_so(rand_skew(3, 5, 5, gen=gen, max_angle=2.5))
    w = random_weights(4, gen)
    m = karcher_mean(rots, w)
    torch.testing.assert_close(karcher_mean(g @ rots @ h, w), g @ m @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(karcher_mean(rots.mT, w), m.mT, rtol=0, atol=1e-12)


def test_karcher_mean_errors() -> None:
    r = torch.eye(3, dtype=F64).expand(2, 1, 3, 3)
    with pytest.raises(ConfigError):
        karcher_mean(r, [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError):
        karcher_mean(r, [1.0, -1.0])
    with pytest.raises(ConfigError):
        karcher_mean(r, max_iter=0)
    with pytest.raises(IncompatibleInputsError):
        karcher_mean(torch.eye(3, dtype=F64))
    with pytest.raises(NumericalError, match="not orthogonal"):
        karcher_mean(torch.stack([torch.eye(3, dtype=F64), 2 * torch.eye(3, dtype=F64)]))
    gen = torch.Generator().manual_seed(10)
    spread = exp_so(rand_skew(4, 1, 6, 6, gen=gen, max_angle=2.5))
    with pytest.raises(NumericalError, match="did not converge in 1 iterations"):
        karcher_mean(spread, max_iter=1)


# ---------------------------------------------------------------- merge in log coordinates


def test_merge_skew_is_log_of_karcher_mean_and_commutative_case() -> None:
    gen = torch.Generator().manual_seed(11)
    a = rand_skew(3, 4, 6, 6, gen=gen, max_angle=0.7)
    w = random_weights(3, gen)
    out = karcher_merge_skew(a, w)
    torch.testing.assert_close(out, log_so(karcher_mean(exp_so(a), w)), rtol=0, atol=1e-14)
    # commuting inputs (one plane, different angles): the mean in log coordinates is linear
    axis = torch.randn(3, dtype=F64, generator=gen)
    logs = torch.stack([so3_log(rodrigues(axis, t)) for t in (0.2, 1.0, -0.5)])[:, None]
    torch.testing.assert_close(karcher_merge_skew(logs, w), (w[:, None, None, None] * logs).sum(0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_magnitude_correction(granularity: str) -> None:
    gen = torch.Generator().manual_seed(12)
    a = rand_skew(4, 5, 8, 8, gen=gen, max_angle=0.6)
    w = random_weights(4, gen)
    plain = karcher_merge_skew(a, w)
    out = karcher_merge_skew(a, w, magnitude_correction=True, granularity=granularity)
    if granularity == "module":
        expected_norm = sum(float(w[i]) * float(a[i].norm()) for i in range(4))
        assert math.isclose(float(out.norm()), expected_norm, rel_tol=1e-12)
        torch.testing.assert_close(out, plain * (expected_norm / float(plain.norm())), rtol=0, atol=1e-14)
    else:
        for k in range(5):
            expected_norm = sum(float(w[i]) * float(a[i, k].norm()) for i in range(4))
            assert math.isclose(float(out[k].norm()), expected_norm, rel_tol=1e-12)
            torch.testing.assert_close(out[k], plain[k] * (expected_norm / float(plain[k].norm())), rtol=0, atol=1e-14)


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_magnitude_correction_of_a_zero_mean_is_zero(granularity: str) -> None:
    axis = torch.tensor([0.3, -1.0, 0.5], dtype=F64)
    logs = torch.stack([so3_log(rodrigues(axis, 0.4)), so3_log(rodrigues(axis, -0.4))])[:, None]
    out = karcher_merge_skew(logs, None, magnitude_correction=True, granularity=granularity)
    assert torch.isfinite(out).all() and float(out.abs().max()) < 1e-15
    zeros = torch.zeros(3, 2, 4, 4, dtype=F64)
    assert torch.equal(karcher_merge_skew(zeros, None, magnitude_correction=True, granularity=granularity), zeros[0])


def test_merge_skew_errors() -> None:
    a = torch.zeros(2, 1, 3, 3, dtype=F64)
    with pytest.raises(ConfigError, match="granularity"):
        karcher_merge_skew(a, None, granularity="tensor")
    not_skew = a.clone()
    not_skew[0, 0, 0, 1] = 0.3
    with pytest.raises(NumericalError, match="not skew-symmetric"):
        karcher_merge_skew(not_skew, None)
    big = torch.stack([so3_log(rodrigues(torch.tensor([0.0, 0.0, 1.0], dtype=F64), 1.0)) * 3.3, a[0, 0]])[:, None]
    with pytest.raises(NumericalError, match="not a principal logarithm"):
        karcher_merge_skew(big, None)


# ---------------------------------------------------------------- OFT method registry ("karcher" in ops/so_merge.py)


def test_oft_karcher_method_satisfies_the_defining_property() -> None:
    from peft_orthomerge.ops.cayley import cayley
    from peft_orthomerge.ops.skew import vec_to_skew
    from peft_orthomerge.ops.so_merge import merge_module

    gen = torch.Generator().manual_seed(13)
    vecs = [0.1 * torch.randn(3, 15, dtype=F64, generator=gen) for _ in range(3)]  # b = 6
    w = [0.5, 0.2, 0.3]
    merged = merge_module(vecs, w, method="karcher")
    m = cayley(vec_to_skew(merged.vec, 6))
    rots = [cayley(vec_to_skew(v, 6)) for v in vecs]
    for blk in range(3):
        total = sum(wi * eig_log(m[blk].T @ r[blk]) for wi, r in zip(w, rots))
        assert float(total.abs().max()) < 1e-10
    single = merge_module(vecs[:1], [1.0], method="karcher")
    torch.testing.assert_close(single.vec, vecs[0], rtol=0, atol=1e-13)
