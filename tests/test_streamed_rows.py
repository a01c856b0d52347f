"""Residual methods by row blocks (`ops.streamed_rows`, `decouple.decouple_merge_rows`) against the in-memory ones."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama
from safetensors.torch import load_file
from test_merge_models import _save_expert
from test_streamed import _no_streaming

from peft_orthomerge import merge_models
from peft_orthomerge.ops import euclidean, fisher_rao, streamed_rows
from peft_orthomerge.ops.decouple import decouple_merge, decouple_merge_rows
from peft_orthomerge.ops.row_tasks import row_blocks

F64 = torch.float64
METHODS = {
    "ties": {"density": 0.3},
    "dare_ties": {"p": 0.4, "seed": 3},
    "dare_ta": {"p": 0.2, "lam": 0.8},
    "tsvm": {"lam": 0.7},
    "fisher_rao": {},
}
IN_MEMORY = {"fisher_rao": fisher_rao.fisher_rao}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-300))


class _Rows:
    """`row_tasks.RowTasks` over in-memory task vectors (fresh copies of the row slices)."""

    def __init__(self, taus, step, base=None):
        self.taus, self.shape, self.count, self.step = taus, tuple(taus[0].shape), len(taus), step
        self.base = base

    def rows(self, i, start, stop):
        return self.taus[i][start:stop].clone()

    def base_rows(self, start, stop):
        return self.base[start:stop]


def _merged(method, taus, weights, step, base=None, **kwargs):
    rows = _Rows(taus, step, base)
    merged = streamed_rows.row_method(method)(rows, weights, dtype=taus[0].dtype, **kwargs)
    return torch.cat([merged(a, b) for a, b in row_blocks(rows.shape[0], step)])


@pytest.fixture
def small_collect(monkeypatch):
    """Force the histogram passes of the selection (several levels) on small tensors."""
    monkeypatch.setattr(streamed_rows, "COLLECT_LIMIT", 7)
    monkeypatch.setattr(streamed_rows, "SELECT_BITS", 9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("quantized", [False, True])
def test_magnitude_thresholds_are_exact(dtype, quantized, small_collect):
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(37, 6, generator=gen, dtype=dtype) for _ in range(3)]
    if quantized:  # many equal magnitudes, also across the threshold
        taus = [(t * 2).round() / 2 for t in taus]
    ks = [1, 40, 222]
    got = streamed_rows.magnitude_thresholds(_Rows(taus, 5), ks, dtype)
    assert got == [euclidean.magnitude_threshold(t, k) for t, k in zip(taus, ks)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(40, 7), (23,), (9, 3, 4)])
@pytest.mark.parametrize("step", [1, 4, 100])
def test_row_methods_equal_in_memory(method, shape, step, small_collect):
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    kwargs = METHODS[method]
    base = 3 * torch.randn(shape, generator=gen, dtype=F64)
    fn = IN_MEMORY.get(method) or getattr(euclidean, method)
    expected = fn([t.clone() for t in taus], weights, base=base, **kwargs)
    got = _merged(method, taus, weights, step, base, **kwargs)
    assert _rel(got, expected) < 1e-12  # the masks by position: the same whatever the block size


def test_ties_rows_break_ties_by_position_as_the_whole_tensor(small_collect):
    taus = [torch.tensor([[1.0, -1.0, 1.0], [2.0, 1.0, -1.0], [1.0, 1.0, 0.5]], dtype=F64) for _ in range(2)]
    taus[1] = -taus[1].flip(0)
    expected = euclidean.ties([t.clone() for t in taus], [0.5, 0.5], density=0.5)
    for step in (1, 2):
        assert torch.equal(_merged("ties", taus, [0.5, 0.5], step, density=0.5), expected)
    kept = euclidean.trim_magnitude(taus[0], 0.5)  # k = 4: the 2, then the first three of the 1s
    assert torch.equal(kept, torch.tensor([[1.0, -1.0, 1.0], [2.0, 0, 0], [0, 0, 0]], dtype=F64))


def test_dare_generator_seeds_the_masks_and_is_not_advanced():
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    taus = [torch.randn(6, 10, generator=torch.Generator().manual_seed(i), dtype=F64) for i in range(3)]
    a = euclidean.dare_ties([t.clone() for t in taus], [1 / 3] * 3, generator=gen)
    assert torch.equal(a, euclidean.dare_ties([t.clone() for t in taus], [1 / 3] * 3, seed=5))
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("target", ["global", "conflict", None])
def test_decouple_merge_rows_equals_dense(method, target, small_collect):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(60, 12, generator=gen, dtype=F64)
    experts = [w0 + 0.1 * torch.randn(60, 12, generator=gen, dtype=F64) for _ in range(3)]
    if method != "tsvm":  # TSV-M of a zero residual: the in-memory SVD's vectors are arbitrary
        experts.append(w0.clone())  # an expert equal to the base: P_i = I, rho_i = 0
    weights = [0.4, 0.3, 0.2, 0.1] if len(experts) == 4 else [0.5, 0.3, 0.2]
    kwargs = METHODS[method]
    seeded = torch.Generator().manual_seed(4)
    expected, ref = decouple_merge(w0, experts, weights, target, method, kwargs, generator=seeded)
    got, stats = decouple_merge_rows(
        w0, experts, weights, target, method, kwargs, generator=seeded, block_bytes=12 * 8 * 4 * 7
    )
    assert _rel(got - w0, expected - w0) < 1e-10, _rel(got - w0, expected - w0)
    assert stats.merged_delta_norm == pytest.approx(float(torch.linalg.vector_norm(got - w0)), rel=1e-12)
    if target is not None:
        assert stats.skew_norms == pytest.approx(ref.skew_norms, rel=1e-8, abs=1e-12)
        assert stats.residual_norms == pytest.approx(ref.residual_norms, rel=1e-6)


def test_tsvm_rows_leave_out_zero_tasks():
    """A zero task contributes no triplet; the others merge as TSV-M of them alone, with their weights."""
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(30, 8, generator=gen, dtype=F64) for _ in range(2)]
    got = _merged("tsvm", [*taus, torch.zeros(30, 8, dtype=F64)], [0.3, 0.3, 0.4], 7)
    assert torch.isfinite(got).all() and got.abs().max() > 0
    assert not streamed_rows.fits("tsvm", (8, 30)) and streamed_rows.fits("tsvm", (30, 8))


@pytest.mark.parametrize("on", ["weights", "task_vectors"])
def test_fisher_rao_rows_edge_cases(on):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(20, 3, generator=gen, dtype=F64)
    tau = torch.randn(20, 3, generator=gen, dtype=F64)
    zero = torch.zeros(20, 3, dtype=F64)
    other = torch.randn(20, 3, generator=gen, dtype=F64)
    cases = [
        ([tau, tau.clone()], [0.5, 0.5]),  # identical inputs: returned as they are
        ([tau, other], [1.0, 0.0]),  # weight 0: ignored
        ([tau, zero, other], [0.3, 0.3, 0.4]),  # a zero input (on task vectors): norm 0, no direction
        ([zero, zero], [0.5, 0.5]),
    ]
    for taus, weights in cases:
        expected = fisher_rao.fisher_rao([t.clone() for t in taus], weights, base=base, on=on)
        got = _merged("fisher_rao", taus, weights, 6, base, on=on)
        assert _rel(got, expected) < 1e-12 or torch.equal(got, expected)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    base = root / "base"
    build_tiny_llama().to(F64).save_pretrained(base)  # float64 storage: the comparison is not blurred by a cast
    return base, [_save_expert(root / f"e{i}", i, dtype=F64) for i in (1, 2, 3)]


@pytest.mark.parametrize("method", ["dare_ta", "ties", "tsvm"])
@pytest.mark.parametrize("target", ["conflict", None])
def test_merge_models_by_rows_equals_whole_tensors(checkpoints, method, target, tmp_path, monkeypatch):
    """`merge_models` reading tensors by row blocks against the same merge with whole tensors."""
    base, paths = checkpoints
    weights = [0.5, 0.3, 0.2]
    kw = METHODS[method]
    merge_models(base, paths, tmp_path / "rows", weights, target=target, residual=method, residual_kwargs=kw)
    with monkeypatch.context() as m:
        _no_streaming(m)
        merge_models(base, paths, tmp_path / "whole", weights, target=target, residual=method, residual_kwargs=kw)
    got = load_file(tmp_path / "rows" / "model.safetensors")
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert _rel(got[name], expected[name]) < 1e-10, name
