"""Streamed residual methods (`ops.streamed`) against the in-memory ones, alone, decoupled and in `merge_models`."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama
from safetensors.torch import load_file
from test_merge_models import _save_expert

from peft_orthomerge import merge_models
from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops import euclidean, fisher_rao, streamed, streamed_rows
from peft_orthomerge.ops.decouple import decouple_merge

F64 = torch.float64
METHODS = {
    "ties": {"density": 0.3},
    "dare_ties": {"p": 0.4, "seed": 3},
    "tsvm": {"lam": 0.7},
    "fisher_rao": {},
}
SHAPES = [(7,), (12, 9), (5, 16), (3, 4, 5)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-300))


def _taus(shape, count=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(count)]


def _no_streaming(monkeypatch):
    """The merges as before `ops.streamed` and `ops.streamed_rows`: whole tensors, residuals listed for
    the in-memory methods."""
    from peft_orthomerge.merge import tensor
    from peft_orthomerge.ops.decouple import dense
    from peft_orthomerge.plan import checkpoint

    monkeypatch.setattr(dense, "streamed_method", lambda name: None)
    monkeypatch.setattr(tensor, "streamed_method", lambda name: None)
    monkeypatch.setattr(checkpoint, "row_method", lambda name: None)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", SHAPES)
def test_streamed_equals_in_memory(method, shape):
    if method == "tsvm" and len(shape) == 3:
        pytest.skip("tsvm merges matrices; other tensors take the weighted mean (1-D case)")
    taus = _taus(shape)
    weights = [0.4, 0.3, 0.2, 0.1]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    kwargs = METHODS[method]
    ref = getattr(euclidean, method, None) or fisher_rao.fisher_rao
    expected = ref([t.clone() for t in taus], weights, base=base, **kwargs)
    copies = [t.clone() for t in taus]
    got = streamed.streamed_method(method)(lambda: iter(taus), weights, base=base, **kwargs)
    assert _rel(got, expected) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(taus, copies))  # the caller's task vectors untouched
    fresh = streamed.FreshTasks(lambda: (t.clone() for t in taus))  # new tensors: overwritten in place
    assert _rel(streamed.streamed_method(method)(fresh, weights, base=base, **kwargs), expected) < 1e-10
    if len(shape) == 2:  # transposed (non-contiguous) fresh task vectors
        t_fresh = streamed.FreshTasks(lambda: (t.T.clone().T for t in taus))
        assert _rel(streamed.streamed_method(method)(t_fresh, weights, base=base, **kwargs), expected) < 1e-10


def test_dare_ties_draws_the_in_memory_masks():
    taus = _taus((6, 10))
    weights = [0.25] * 4
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = euclidean.dare_ties([t.clone() for t in taus], weights, generator=gen_a, p=0.5)
    got = streamed.dare_ties(lambda: iter(taus), weights, generator=gen_b, p=0.5)
    assert torch.equal(got, expected)


def test_each_task_counts():
    with pytest.raises(ConfigError):
        streamed.ties(lambda: iter(_taus((3,), 2)), [0.5, 0.3, 0.2])
    with pytest.raises(ConfigError):
        streamed.tsvm(lambda: iter(_taus((3, 3), 3)), [0.5, 0.5])


# -- issue 13 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [euclidean.tsvm, streamed.tsvm])
def test_tsvm_applies_lam_to_non_matrices(fn):
    taus = _taus((8,), 3)
    weights = [0.5, 0.3, 0.2]
    source = taus if fn is euclidean.tsvm else (lambda: iter(taus))
    mean = sum(w * t for w, t in zip(weights, taus))
    assert _rel(fn(source, weights, lam=0.25), 0.25 * mean) < 1e-12


@pytest.mark.parametrize("fn", [euclidean.ties, streamed.ties])
def test_ties_keeps_one_entry_per_task_at_tiny_density(fn):
    a = torch.tensor([0.1, -3.0, 0.2, 0.0], dtype=F64)
    b = torch.tensor([2.0, 0.1, -0.3, 0.1], dtype=F64)
    source = [a, b] if fn is euclidean.ties else (lambda: iter([a, b]))
    got = fn(source, [0.5, 0.5], density=0.1)  # 0.1 * 4 < 1: each task keeps its largest entry
    assert torch.equal(got, torch.tensor([2.0, -3.0, 0.0, 0.0], dtype=F64))


def test_trim_magnitude_keeps_top_k():
    x = torch.tensor([0.5, -4.0, 1.0, 3.0, -0.1], dtype=F64)
    assert torch.equal(euclidean.trim_magnitude(x, 0.4), torch.tensor([0, -4.0, 0, 3.0, 0], dtype=F64))
    assert euclidean.trim_magnitude(x, 1.0) is x
    y = x.clone()
    assert euclidean.trim_magnitude_(y, 0.4) is y and torch.equal(y, euclidean.trim_magnitude(x, 0.4))


# -- decoupled, and merge_models ----------------------------------------------------------------------
def _experts(shape, count=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    return w0, [w0 + 0.1 * torch.randn(shape, generator=gen, dtype=F64) for _ in range(count)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("target", ["global", "conflict", None])
@pytest.mark.parametrize("shape", [(24, 8), (8, 8), (4, 12)])
def test_decouple_merge_streamed_equals_listed(method, target, shape, monkeypatch):
    w0, experts = _experts(shape)
    weights = [0.5, 0.3, 0.2]
    kwargs = METHODS[method]
    got, stats = decouple_merge(w0, experts, weights, target, method, kwargs)
    with monkeypatch.context() as m:
        _no_streaming(m)
        expected, ref_stats = decouple_merge(w0, experts, weights, target, method, kwargs)
    assert _rel(got, expected) < 1e-10
    assert stats.residual_norms == pytest.approx(ref_stats.residual_norms, rel=1e-12)
    assert stats.skew_norms == ref_stats.skew_norms


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    base = root / "base"
    build_tiny_llama().to(F64).save_pretrained(base)  # float64 storage: the comparison is not blurred by a cast
    return base, [_save_expert(root / f"e{i}", i, dtype=F64) for i in (1, 2, 3)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("target", ["global", None])
def test_merge_models_streamed_equals_listed(checkpoints, method, target, tmp_path, monkeypatch):
    base, paths = checkpoints
    weights = [0.5, 0.3, 0.2]
    kw = METHODS[method]
    used = []
    with monkeypatch.context() as m:
        from peft_orthomerge.merge import tensor
        from peft_orthomerge.ops.decouple import dense

        def spy(name):
            used.append(name)
            return streamed.streamed_method(name)

        m.setattr(dense, "streamed_method", spy)
        m.setattr(tensor, "streamed_method", spy)
        merge_models(base, paths, tmp_path / "s", weights, target=target, residual=method, residual_kwargs=kw)
    by_rows = streamed_rows.row_method(method) is not None  # most tensors by row blocks, the rest streamed
    assert set(used) <= {method} if by_rows else set(used) == {method}
    with monkeypatch.context() as m:
        _no_streaming(m)
        merge_models(base, paths, tmp_path / "l", weights, target=target, residual=method, residual_kwargs=kw)
    got, expected = load_file(tmp_path / "s" / "model.safetensors"), load_file(tmp_path / "l" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert _rel(got[name], expected[name]) < 1e-10, name
