"""Fisher-Rao merging (spherical proxy): closed forms, defining property, edge cases, registry.

Expected values are computed here independently: slerp in closed form and the sphere's Log map
from its arccos formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, NumericalError
from peft_orthomerge.ops.fisher_rao import fisher_rao, fisher_rao_merge, spherical_karcher_mean
from peft_orthomerge.ops.registry import euclidean_methods, get_euclidean

F64 = torch.float64


def slerp(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """Point at fraction t of the short great-circle arc from unit x to unit y."""
    omega = math.acos(max(-1.0, min(1.0, float(x @ y))))
    return (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)


def sphere_log(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = max(-1.0, min(1.0, float(m @ x)))
    theta = math.acos(c)
    return torch.zeros_like(m) if theta == 0.0 else theta / math.sin(theta) * (x - c * m)


def expected_two(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Closed form of the merge of two tensors with weights (1 - t, t)."""
    na, nb = a.norm(), b.norm()
    direction = slerp(a.reshape(-1) / na, b.reshape(-1) / nb, t)
    return ((1 - t) * na + t * nb) * direction.reshape(a.shape)


def random_tensors(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, dtype=F64, generator=gen) * (0.5 + i) for i in range(n)]


@pytest.mark.parametrize("t", [0.5, 0.2, 0.9])
def test_two_inputs_give_the_weighted_geodesic_point(t: float) -> None:
    a, b = random_tensors(2, (5, 7), seed=1)
    out = fisher_rao_merge([a, b], [1 - t, t])
    torch.testing.assert_close(out, expected_two(a, b, t), rtol=0, atol=1e-10)
    if t == 0.5:  # the slerp midpoint is the normalised sum of the unit directions
        mid = a / a.norm() + b / b.norm()
        torch.testing.assert_close(out / out.norm(), mid / mid.norm(), rtol=0, atol=1e-12)


def test_nearly_antipodal_but_separated_inputs_still_give_slerp() -> None:
    x = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    y = torch.tensor([math.cos(math.pi - 0.01), math.sin(math.pi - 0.01), 0.0], dtype=F64)
    torch.testing.assert_close(fisher_rao_merge([x, 2 * y]), expected_two(x, 2 * y, 0.5), rtol=0, atol=1e-10)


def test_copies_are_returned_bit_for_bit() -> None:
    (a,) = random_tensors(1, (4, 6), seed=2)
    a32 = a.float()
    assert torch.equal(fisher_rao_merge([a32] * 4, [0.1, 0.2, 0.3, 0.4]), a32)
    assert torch.equal(fisher_rao_merge([a]), a)
    base = torch.randn(4, 6)
    assert torch.equal(fisher_rao([a32, a32, a32], [1 / 3] * 3, base=base), a32)


def test_norm_is_weighted_mean_of_norms_and_log_maps_sum_to_zero() -> None:
    tensors = random_tensors(5, (3, 4, 5), seed=3)
    gen = torch.Generator().manual_seed(30)
    w = (torch.rand(5, dtype=F64, generator=gen) + 0.1).tolist()
    w = [x / sum(w) for x in w]
    out = fisher_rao_merge(tensors, w)
    assert out.shape == (3, 4, 5) and out.dtype == F64
    expected_norm = sum(wi * float(t.norm()) for wi, t in zip(w, tensors))
    assert math.isclose(float(out.norm()), expected_norm, rel_tol=1e-13)
    m = out.reshape(-1) / out.norm()
    total = sum(wi * sphere_log(m, t.reshape(-1) / t.norm()) for wi, t in zip(w, tensors))
    assert float(total.norm()) < 1e-9


def test_order_independence() -> None:
    tensors = random_tensors(4, (6, 6), seed=4)
    w = [0.1, 0.4, 0.2, 0.3]
    perm = [2, 0, 3, 1]
    out = fisher_rao_merge(tensors, w)
    torch.testing.assert_close(
        fisher_rao_merge([tensors[i] for i in perm], [w[i] for i in perm]), out, rtol=0, atol=1e-12
    )


def test_zero_inputs_contribute_norm_zero_and_no_direction() -> None:
    a, b = random_tensors(2, (4, 5), seed=5)
    z = torch.zeros(4, 5, dtype=F64)
    w = [0.5, 0.3, 0.2]
    out = fisher_rao_merge([a, z, b], w)
    direction = expected_two(a, b, 0.2 / 0.7)  # the non-zero inputs, weights renormalised
    expected = (0.5 * a.norm() + 0.2 * b.norm()) * direction / direction.norm()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    # one non-zero expert: task arithmetic
    torch.testing.assert_close(fisher_rao_merge([z, a], [0.25, 0.75]), 0.75 * a, rtol=0, atol=1e-14)
    assert torch.equal(fisher_rao_merge([z, z.clone()], None), z)
    assert torch.equal(fisher_rao_merge([z.float(), z.float(), a.float() * 0], None), z.float())


def test_zero_weight_inputs_are_ignored_even_antipodal() -> None:
    a, b = random_tensors(2, (3, 3), seed=6)
    out = fisher_rao_merge([a, -a, b], [0.4, 0.0, 0.6])
    torch.testing.assert_close(out, expected_two(a, b, 0.6), rtol=0, atol=1e-10)


def test_antipodal_inputs_raise() -> None:
    (a,) = random_tensors(1, (3, 4), seed=7)
    with pytest.raises(NumericalError, match="cancel"):
        fisher_rao_merge([a, -2 * a])
    with pytest.raises(NumericalError, match="antipode"):
        fisher_rao_merge([a, -a], [0.7, 0.3])
    e = torch.zeros(3, 4, dtype=F64)
    e[0, 0] = 1.0
    with pytest.raises(NumericalError, match="cancel"):
        fisher_rao_merge([a, -a + 1e-9 * e])  # nearly antipodal at equal weights
    third = [torch.tensor([math.cos(k * 2 * math.pi / 3), math.sin(k * 2 * math.pi / 3)], dtype=F64) for k in range(3)]
    with pytest.raises(NumericalError, match="cancel"):
        fisher_rao_merge(third)


def test_dtypes_and_float32_computation() -> None:
    tensors = random_tensors(3, (8, 8), seed=8)
    ref = fisher_rao_merge(tensors)
    out16 = fisher_rao_merge([t.to(torch.bfloat16) for t in tensors])
    assert out16.dtype == torch.bfloat16
    mixed = fisher_rao_merge([tensors[0].float(), tensors[1].to(torch.bfloat16), tensors[2].float()])
    assert mixed.dtype == torch.float32
    out32 = fisher_rao_merge([t.float() for t in tensors], compute_dtype=torch.float32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-4 * float(ref.norm()))
    with pytest.raises(ConfigError, match="compute_dtype"):
        fisher_rao_merge(tensors, compute_dtype=torch.float16)


def test_invalid_inputs() -> None:
    a, b = random_tensors(2, (3, 4), seed=9)
    with pytest.raises(IncompatibleInputsError, match="different shapes"):
        fisher_rao_merge([a, b.T])
    with pytest.raises(ConfigError):
        fisher_rao_merge([a, b], [1.0])
    with pytest.raises(ConfigError):
        fisher_rao_merge([], None)
    bad = a.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        fisher_rao_merge([a, bad])
    with pytest.raises(ConfigError, match="tol"):
        fisher_rao_merge([a, b], tol=0.0)


def test_non_convergence_raises() -> None:
    gen = torch.Generator().manual_seed(10)
    points = torch.randn(5, 3, dtype=F64, generator=gen)
    points[:, 0] = points[:, 0].abs() * 0.05  # spread over nearly a hemisphere: slow convergence
    points = points / points.norm(dim=1, keepdim=True)
    with pytest.raises(NumericalError, match="did not converge in 2 iterations"):
        spherical_karcher_mean(points, [0.2] * 5, max_iter=2)
    m = spherical_karcher_mean(points, [0.2] * 5)
    total = sum(0.2 * sphere_log(m, x) for x in points)
    assert float(total.norm()) < 1e-9


# ---------------------------------------------------------------- registry entry


def test_registry_on_weights_merges_full_weights() -> None:
    assert "fisher_rao" in euclidean_methods()
    fn = get_euclidean("fisher_rao")
    assert fn is fisher_rao
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(6, 5, generator=gen)
    taus = [0.1 * torch.randn(6, 5, generator=gen) for _ in range(2)]
    out = fn(taus, [0.3, 0.7], base=base, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    full = [base.double() + t.double() for t in taus]
    expected = expected_two(full[0], full[1], 0.7) - base.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # full-weights and task-vector readings differ
    on_tv = fn(taus, [0.3, 0.7], on="task_vectors")
    torch.testing.assert_close(
        on_tv.double(), expected_two(taus[0].double(), taus[1].double(), 0.7), rtol=0, atol=1e-6
    )
    assert not torch.allclose(on_tv, out, atol=1e-3)


def test_registry_errors() -> None:
    fn = get_euclidean("fisher_rao")
    taus = [torch.randn(3, 3), torch.randn(3, 3)]
    with pytest.raises(ConfigError, match="needs the base tensor"):
        fn(taus, [0.5, 0.5])
    with pytest.raises(ConfigError, match="on must be"):
        fn(taus, [0.5, 0.5], base=torch.zeros(3, 3), on="deltas")
    with pytest.raises(IncompatibleInputsError):
        fn(taus, [0.5, 0.5], base=torch.zeros(3, 4))
    with pytest.raises(ConfigError):
        fn([], [], base=torch.zeros(3, 3))
