"""so(b) primitives (`ops/skew.py`) and per-module merges (`ops/so_merge.py`) against PEFT and dense references."""

from __future__ import annotations

import pytest
import torch
from _oft_utils import ref_cayley, ref_orthomerge, ref_peft_rotation, ref_skew
from peft.tuners.oft.layer import OFTRotationModule

from peft_orthomerge.errors import ConfigError, InputError, NumericalError
from peft_orthomerge.ops import skew
from peft_orthomerge.ops.cayley import cayley, inverse_cayley
from peft_orthomerge.ops.orthogonality import max_orthogonality_error
from peft_orthomerge.ops.so_merge import merge_module


def _vec(r, b, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, b * (b - 1) // 2, generator=g, dtype=torch.float64) * std


@pytest.mark.parametrize("b", [2, 3, 8, 16])
def test_layout_matches_loops_and_peft(b):
    vec = _vec(3, b, b)
    q = skew.vec_to_skew(vec)
    torch.testing.assert_close(q, ref_skew(vec), rtol=0, atol=0)
    mod = OFTRotationModule(3, vec.shape[1], b, 3 * b)
    torch.testing.assert_close(q, mod._pytorch_skew_symmetric(vec, b), rtol=0, atol=0)
    torch.testing.assert_close(skew.skew_to_vec(q), vec, rtol=0, atol=0)
    assert skew.block_size_from_n(vec.shape[1]) == b


@pytest.mark.parametrize("n", [0, 2, 4, 119])
def test_non_triangular_length_is_refused(n):
    with pytest.raises(InputError):
        skew.block_size_from_n(n)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_neumann_is_peft_term_for_term(terms):
    vec = _vec(4, 8, terms, std=0.2)
    mod = OFTRotationModule(4, vec.shape[1], 8, 32, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    peft_r = mod._cayley_batch(vec, 8, True, terms)
    ours = skew.neumann_rotation(skew.vec_to_skew(vec), terms)
    torch.testing.assert_close(ours, peft_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref_peft_rotation(ref_skew(vec), True, terms), rtol=1e-12, atol=1e-12)


def test_exact_flag_is_cayley_of_minus_q():
    vec = _vec(4, 8, 3, std=0.3)
    mod = OFTRotationModule(4, vec.shape[1], 8, 32, use_cayley_neumann=False)
    peft_r = mod._cayley_batch(vec.float(), 8, False).double()
    canonical = skew.to_canonical(vec, use_cayley_neumann=False)
    torch.testing.assert_close(cayley(skew.vec_to_skew(canonical)), peft_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        skew.peft_rotation(skew.vec_to_skew(canonical), False), ref_peft_rotation(ref_skew(vec), False)
    )
    torch.testing.assert_close(skew.from_canonical(canonical, False), vec, rtol=0, atol=0)


def test_cayley_inverse_round_trip_and_orthogonality():
    q = ref_skew(_vec(5, 6, 4, std=0.5))
    r = cayley(q)
    torch.testing.assert_close(r, ref_cayley(q))
    assert max_orthogonality_error(r) < 1e-13
    torch.testing.assert_close(inverse_cayley(r), q, rtol=1e-10, atol=1e-12)
    neumann = skew.neumann_rotation(q, 5)
    eye = torch.eye(6, dtype=torch.float64)
    expected = max(float(torch.linalg.matrix_norm(x.T @ x - eye)) for x in neumann)
    assert max_orthogonality_error(neumann) == pytest.approx(expected, rel=1e-12)
    assert expected > 1e-6  # the truncation is visible at this size


def test_inverse_cayley_refuses_half_turn():
    r = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    r[1, :2, :2] = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(NumericalError):
        inverse_cayley(r)


def _qs(n, r=3, b=6, std=0.1):
    return [_vec(r, b, 10 + i, std=std * (i + 1)) for i in range(n)]


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_orthomerge_matches_dense_reference(granularity):
    vecs = _qs(3)
    weights = [0.5, 0.2, 0.3]
    out = merge_module(vecs, weights, granularity=granularity, scale=0.7)
    expected = ref_orthomerge([ref_skew(v) for v in vecs], weights, granularity) * 0.7
    torch.testing.assert_close(ref_skew(out.vec), expected, rtol=1e-12, atol=1e-14)
    assert out.input_norms == pytest.approx([float(torch.linalg.vector_norm(ref_skew(v))) for v in vecs])
    assert out.merged_norm == pytest.approx(float(torch.linalg.vector_norm(expected)))
    s = sum(w * ref_skew(v) for w, v in zip(weights, vecs))
    if granularity == "module":
        target = sum(w * n for w, n in zip(weights, out.input_norms))
        assert out.magnitude_factor == pytest.approx(target / float(torch.linalg.vector_norm(s)))
        assert out.merged_norm == pytest.approx(0.7 * target)
    else:
        assert out.extra["c_block_min"] <= out.extra["c_block_max"]


def test_single_input_and_zero_sum():
    v = _vec(2, 5, 1)
    out = merge_module([v], [1.0])
    torch.testing.assert_close(out.vec, v, rtol=1e-14, atol=1e-16)
    assert out.magnitude_factor == pytest.approx(1.0)
    for granularity in ("module", "block"):
        zero = merge_module([v, -v], [0.5, 0.5], granularity=granularity)
        assert torch.equal(zero.vec, torch.zeros_like(v)) and zero.magnitude_factor is None
        allzero = merge_module([torch.zeros_like(v)] * 2, [0.5, 0.5], granularity=granularity)
        assert torch.equal(allzero.vec, torch.zeros_like(v))


def test_ablation_methods_against_dense():
    vecs = _qs(3, std=0.2)
    w = [0.2, 0.3, 0.5]
    qs = [ref_skew(v) for v in vecs]
    out = merge_module(vecs, w, method="mean_q")
    torch.testing.assert_close(ref_skew(out.vec), sum(a * q for a, q in zip(w, qs)))
    out = merge_module(vecs, w, method="mean_r")
    assert out.vec is None
    torch.testing.assert_close(out.rotation, sum(a * ref_cayley(q) for a, q in zip(w, qs)))
    with pytest.raises(ConfigError):
        merge_module(vecs, w, method="mean_r", scale=2.0)
    out = merge_module(vecs, w, method="product_r", scale=0.5)
    prod = ref_cayley(3 * w[0] * qs[0]) @ ref_cayley(3 * w[1] * qs[1]) @ ref_cayley(3 * w[2] * qs[2])
    torch.testing.assert_close(ref_cayley(ref_skew(out.vec) / 0.5), prod, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError):
        merge_module(vecs, w, method="nope")


def test_karcher_of_identical_rotations_is_that_rotation():
    v = _vec(3, 4, 2, std=0.2)
    out = merge_module([v, v], [0.5, 0.5], method="karcher")
    torch.testing.assert_close(out.vec, v, rtol=1e-9, atol=1e-11)
