"""The row-block (Gram) path of decoupled task arithmetic, `ops.decouple.rows`.

Checked against the independent dense float64 reference of `test_decouple_ops` (explicit SVDs,
inverses and residuals), against the library's own explicit-residual path for the statistics,
and for invariance to the block size: a `RowSource` that records every request proves that no
block larger than asked for is ever read.
"""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)
from test_decouple_ops import ref_merge

from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, NumericalError
from peft_orthomerge.ops.decouple import TensorRows, decouple_merge, decouple_merge_ta_rows, task_arithmetic_rows
from peft_orthomerge.ops.euclidean import ta_coefficients

F64 = torch.float64
# square, tall (gate/up, embeddings), barely-wide (n/2 <= out < n) and a rank-deficient tall base
SHAPES = [(48, 48), (120, 40), (30, 48), (90, 32)]


def _experts(out: int, n: int, count: int, seed: int, noise: float = 0.2, rank_deficient: bool = False):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=gen, dtype=F64) / n**0.5
    if rank_deficient:
        w0[:, -3:] = 0
    experts = [w0 + noise * torch.randn(out, n, generator=gen, dtype=F64) / n**0.5 for _ in range(count)]
    return w0, experts


class CountingRows(TensorRows):
    """A `RowSource` recording the largest block requested."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tensor)
        self.largest = 0
        self.calls = 0

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self.largest = max(self.largest, stop - start)
        self.calls += 1
        return super().rows(start, stop)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_reference(shape, target):
    w0, experts = _experts(*shape, 3, seed=1, rank_deficient=shape == (90, 32))
    weights = [0.2, 0.3, 0.5]
    got, stats = decouple_merge_ta_rows(w0, experts, weights, target, solver="svd")
    want = ref_merge(w0, experts, weights, target)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    rotated = target == "global" or sum(stats.rows_kept) > 0
    assert stats.solver == ("svd" if rotated else "identity") and stats.solver_error < 1e-12
    assert stats.merged_delta_norm == pytest.approx(float((want - w0).norm()), rel=1e-10)


@pytest.mark.parametrize("lam", [None, 0.7])
def test_lam_and_weights_follow_the_ta_method(lam):
    w0, experts = _experts(64, 48, 4, seed=2)
    weights = [0.1, 0.2, 0.3, 0.4]
    kwargs = None if lam is None else {"lam": lam}
    got, _ = decouple_merge_ta_rows(w0, experts, weights, "global", kwargs)
    assert torch.allclose(got, ref_merge(w0, experts, weights, "global", lam=lam), atol=1e-10, rtol=0)
    expected = [(1 / 4 if lam is None else lam) * 4 * w for w in weights]
    assert ta_coefficients(weights, **(kwargs or {})) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("solver", ["svd", "newton_schulz"])
def test_statistics_equal_the_explicit_residual_path(target, solver):
    """DARE with p = 0 is TA computed with explicit residuals ``W_i - W0 P_i``: same numbers."""
    w0, experts = _experts(70, 40, 3, seed=3, noise=0.3)
    experts[1] = 2 * w0 - experts[0]  # opposite task vectors: the conflict target keeps rows
    experts.append(w0.clone())  # an expert equal to the base: P = I, Q = 0, rho = 0
    weights = [0.4, 0.3, 0.2, 0.1]
    got, fast = decouple_merge_ta_rows(w0, experts, weights, target, {"lam": 0.5}, solver)
    want, slow = decouple_merge(w0, experts, weights, target, "dare_ta", {"p": 0.0, "lam": 0.5}, solver)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    for key in ("task_vector_norms", "skew_norms", "orth_part_norms", "residual_norms"):
        assert getattr(fast, key) == pytest.approx(getattr(slow, key), abs=1e-9), key
    assert fast.skew_norms[-1] == 0.0 and fast.residual_norms[-1] == pytest.approx(0.0, abs=1e-7)
    assert fast.rows_kept == slow.rows_kept
    assert target == "global" or sum(fast.rows_kept) > 0
    assert fast.magnitude_factor == pytest.approx(slow.magnitude_factor, rel=1e-12)


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_blocks_are_bounded_and_do_not_change_the_result(target):
    w0, experts = _experts(100, 24, 3, seed=4)
    weights = [1 / 3] * 3
    whole, _ = decouple_merge_ta_rows(w0, experts, weights, target)
    sources = [CountingRows(e) for e in experts]
    base = CountingRows(w0)
    block_bytes = (
        7 * 24 * 8 * (3 if target == "conflict" else 1)
    )  # 7 rows of float64 per block (conflict: / 3 experts)
    got, _ = decouple_merge_ta_rows(base, sources, weights, target, block_bytes=block_bytes)
    assert torch.allclose(got, whole, atol=1e-13, rtol=0)
    assert base.largest == 7 and all(s.largest == 7 for s in sources)
    assert base.calls == 2 * 15  # ceil(100 / 7) blocks, two passes


def test_float32_and_output_dtype():
    w0, experts = _experts(96, 64, 3, seed=5)
    weights = [0.5, 0.25, 0.25]
    exact, _ = decouple_merge_ta_rows(w0, experts, weights)
    fast, _ = decouple_merge_ta_rows(w0.float(), [e.float() for e in experts], weights, dtype=torch.float32, rtol=1e-5)
    assert fast.dtype == torch.float32
    assert float((fast.double() - exact).norm() / exact.norm()) < 1e-5
    bf16, stats = decouple_merge_ta_rows(w0, experts, weights, out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, exact.to(torch.bfloat16))
    assert stats.merged_delta_norm == pytest.approx(float((exact - w0).norm()), rel=1e-12)


def test_identical_experts_give_the_base_and_a_pure_rotation_has_no_residual():
    w0, _ = _experts(64, 32, 1, seed=6)
    same, stats = decouple_merge_ta_rows(w0, [w0.clone(), w0.clone()], [0.5, 0.5])
    assert torch.equal(same, w0) and stats.solver == "identity" and stats.magnitude_factor is None
    gen = torch.Generator().manual_seed(7)
    a = 0.05 * torch.randn(32, 32, generator=gen, dtype=F64)
    rot = torch.linalg.matrix_exp(a - a.T)
    got, stats = decouple_merge_ta_rows(w0, [w0 @ rot], [1.0])
    assert torch.allclose(got, w0 @ rot, atol=1e-12, rtol=0)
    assert stats.residual_norms[0] < 1e-7 * stats.task_vector_norms[0]


def test_task_arithmetic_rows_any_shape():
    gen = torch.Generator().manual_seed(8)
    for shape in [(37,), (9, 5, 4), (0, 3)]:
        w0 = torch.randn(shape, generator=gen, dtype=F64)
        experts = [w0 + torch.randn(shape, generator=gen, dtype=F64) for _ in range(3)]
        weights = [0.2, 0.3, 0.5]
        got, norm = task_arithmetic_rows(w0, experts, weights, {"lam": 0.9}, block_bytes=64)
        want = w0 + 0.9 * 3 * sum(w * (e - w0) for w, e in zip(weights, experts))
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        assert norm == pytest.approx(float((want - w0).norm()), abs=1e-12)


def test_bad_inputs():
    w0, experts = _experts(40, 32, 2, seed=9)
    bad = experts[1].clone()
    bad[33, 3] = float("nan")
    with pytest.raises(NumericalError, match="mlp.up_proj"):
        decouple_merge_ta_rows(w0, [experts[0], bad], [0.5, 0.5], name="mlp.up_proj", block_bytes=8 * 32 * 8)
    with pytest.raises(IncompatibleInputsError, match="shape mismatch"):
        decouple_merge_ta_rows(w0, [experts[0][:, :16]], [1.0])
    with pytest.raises(ConfigError):
        decouple_merge_ta_rows(w0, experts, [0.5, 0.5], None)
    with pytest.raises(ConfigError):
        decouple_merge_ta_rows(w0, experts, [1.0])
    with pytest.raises(ConfigError):
        task_arithmetic_rows(torch.tensor(1.0), [torch.tensor(2.0)], [1.0])


def test_decouple_merge_dispatches_ta_here():
    """`decouple_merge` with TA on ``2 out >= in`` is this path (same numbers, same statistics)."""
    w0, experts = _experts(64, 64, 2, seed=10)
    a, sa = decouple_merge(w0, experts, [0.5, 0.5], "global", "ta")
    b, sb = decouple_merge_ta_rows(w0, experts, [0.5, 0.5], "global")
    assert torch.equal(a, b) and sa.residual_norms == sb.residual_norms


@pytest.mark.parametrize("residual", ["ta", "ties", "tsvm"])
@pytest.mark.parametrize("shape", [(40, 64), (24, 64), (96, 64)])  # rows out < in, reduced, tall
def test_float32_default_rank_threshold_leaves_the_null_space_alone(shape, residual):
    """float32 math with the default rank threshold (`closest_polar.rank_rtol`): a rank-deficient
    ``M = W0^T W_i`` (``out < in``) has float32 noise on its null space, which the float64 threshold
    (1e-11) would count as rank, rotating that null space arbitrarily (a 16% error on an embedding
    with vocabulary < hidden before the threshold depended on the dtype)."""
    w0, experts = _experts(*shape, 3, seed=11, noise=0.05)
    weights = [0.5, 0.25, 0.25]
    exact, _ = decouple_merge(w0, experts, weights, "global", residual, solver="svd")
    fast, _ = decouple_merge(
        w0.float(), [e.float() for e in experts], weights, "global", residual, dtype=torch.float32
    )
    assert float((fast.double() - exact).norm() / exact.norm()) < 1e-5


def _conditioned(out: int, n: int, count: int, seed: int, decades: float):
    """A base with singular values from 1 down to ``10^-decades`` and ``count`` experts near it
    (5 decades: ``cond(M = W0^T W_i)`` near ``1e10``, which the eigh route cannot certify)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(out, n)
    u = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64)).Q
    w0 = (u * torch.logspace(0, -decades, r, dtype=F64)) @ v.T
    return w0, [w0 + 0.01 * torch.randn(out, n, generator=gen, dtype=F64) / n**0.5 for _ in range(count)]


@pytest.mark.parametrize("shape", [(48, 48), (120, 40), (16, 48)])  # rows path, tall rows path, reduced basis
def test_one_failed_eigh_sends_the_other_experts_to_the_svd(monkeypatch, shape):
    from peft_orthomerge.ops import closest_polar as cp

    calls = []
    real = cp.polar_by_eigh
    monkeypatch.setattr(cp, "polar_by_eigh", lambda a: calls.append(a.shape) or real(a))
    w0, experts = _conditioned(*shape, 4, seed=5, decades=5)
    weights = [0.25] * 4
    got, stats = decouple_merge(w0, experts, weights, solver="eigh")
    assert len(calls) == 1  # tried once; the other three experts share W0's conditioning
    assert stats.solver == "eigh" and stats.solver_fallback == 4  # every expert counted as answered by the SVD
    want, _ = decouple_merge(w0, experts, weights, solver="svd")
    assert torch.allclose(got, want, atol=1e-12 * float(want.abs().max()), rtol=0)


def test_a_certified_eigh_is_kept_for_every_expert(monkeypatch):
    from peft_orthomerge.ops import closest_polar as cp

    calls = []
    real = cp.polar_by_eigh
    monkeypatch.setattr(cp, "polar_by_eigh", lambda a: calls.append(a.shape) or real(a))
    w0, experts = _conditioned(48, 48, 3, seed=2, decades=0.5)
    _, stats = decouple_merge(w0, experts, [0.2, 0.3, 0.5], solver="eigh")
    assert len(calls) == 3 and stats.solver_fallback == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
def test_a_non_finite_entry_in_any_block_is_refused_in_the_storage_dtype(value, dtype):
    """The row loader checks each block as stored (before the float64 copy), base and experts alike."""
    w0, experts = _experts(40, 32, 2, seed=9)
    for victim in (0, 2):  # the base, the second expert
        inputs = [t.to(dtype) for t in (w0, *experts)]
        inputs[victim][37, 5] = value  # in the last block
        with pytest.raises(NumericalError, match="NaN or Inf"):
            decouple_merge_ta_rows(inputs[0], inputs[1:], [0.5, 0.5], name="q_proj", block_bytes=8 * 32 * 8)
