"""Every Euclidean residual method against its definition, written out explicitly."""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)

from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops import euclidean
from peft_orthomerge.ops.registry import euclidean_methods, get_euclidean

F64 = torch.float64


def _taus(count=3, shape=(12, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=F64) for _ in range(count)]


def test_registered():
    assert {"ta", "ties", "dare_ta", "dare_ties", "tsvm"} <= set(euclidean_methods())


def test_task_arithmetic():
    taus = _taus()
    ta = get_euclidean("ta")
    assert torch.allclose(ta(taus, [1 / 3] * 3, lam=0.4), 0.4 * (taus[0] + taus[1] + taus[2]), atol=1e-14)
    assert torch.allclose(ta(taus, [1 / 3] * 3), (taus[0] + taus[1] + taus[2]) / 3, atol=1e-14)
    w = [0.5, 0.3, 0.2]
    assert torch.allclose(ta(taus, w), 0.5 * taus[0] + 0.3 * taus[1] + 0.2 * taus[2], atol=1e-14)


def _ties_reference(taus, weights, density, lam):
    count = len(taus)
    trimmed = []
    for t in taus:
        k = int(density * t.numel())
        flat = t.reshape(-1)
        keep = torch.zeros_like(flat)
        order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:k]
        keep[order] = 1
        trimmed.append((flat * keep).reshape(t.shape))
    out = torch.zeros_like(taus[0])
    for idx in range(out.numel()):
        vals = [float(count * w * t.reshape(-1)[idx]) for w, t in zip(weights, trimmed)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and (v > 0) == (sign > 0)]
        out.reshape(-1)[idx] = sum(agree) / max(1, len(agree))
    return lam * out


@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.6, 0.3, 0.1]])
def test_ties(weights):
    taus = _taus(shape=(6, 10))
    got = get_euclidean("ties")(taus, weights)
    assert torch.allclose(got, _ties_reference(taus, weights, 0.2, 1.0), atol=1e-14)
    got = get_euclidean("ties")(taus, weights, density=0.5, lam=0.8)
    assert torch.allclose(got, _ties_reference(taus, weights, 0.5, 0.8), atol=1e-14)


def _dare_masks(taus, p, seed):
    """The definition: entry j of task i kept when draw j mod CHUNK of the stream (seed, i, j // CHUNK) is >= p."""
    out = []
    for i, t in enumerate(taus):
        chunks = -(-t.numel() // euclidean.DARE_CHUNK)
        draws = torch.cat(
            [
                torch.rand(
                    euclidean.DARE_CHUNK,
                    generator=torch.Generator().manual_seed(euclidean.dare_stream_seed(seed, i, j)),
                    dtype=F64,
                )
                for j in range(chunks)
            ]
        )
        out.append(t * (draws[: t.numel()] >= p).view(t.shape) / (1 - p))
    return out


def test_dare_masks_follow_positions_across_chunks():
    """A mask over a range that straddles chunks equals the slices of the whole-tensor mask."""
    whole = euclidean.dare_keep(0, 3 * euclidean.DARE_CHUNK, 0.4, 11, 2)
    part = euclidean.dare_keep(euclidean.DARE_CHUNK - 5, 2 * euclidean.DARE_CHUNK + 7, 0.4, 11, 2)
    assert torch.equal(part, whole[euclidean.DARE_CHUNK - 5 : 2 * euclidean.DARE_CHUNK + 7])
    assert not torch.equal(whole, euclidean.dare_keep(0, 3 * euclidean.DARE_CHUNK, 0.4, 11, 3))
    assert 0.35 < float(whole.double().mean()) < 0.65


def test_dare_ta_and_ties_definition_and_seed():
    taus = _taus(shape=(6, 10))
    w = [1 / 3] * 3
    dropped = _dare_masks(taus, 0.3, 5)
    got = get_euclidean("dare_ta")(taus, w, p=0.3, seed=5)
    assert torch.allclose(got, sum(dropped) / 3, atol=1e-14)
    got = get_euclidean("dare_ties")(taus, w, p=0.3, seed=5)
    assert torch.allclose(got, _ties_reference(dropped, w, 1.0, 1.0), atol=1e-14)
    # reproducible with an explicit generator; a different seed gives a different result
    a = get_euclidean("dare_ta")(taus, w, generator=torch.Generator().manual_seed(1))
    b = get_euclidean("dare_ta")(taus, w, generator=torch.Generator().manual_seed(1))
    c = get_euclidean("dare_ta")(taus, w, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # about a fraction p of the entries are dropped
    frac = float((dropped[0] == 0).double().mean())
    assert 0.15 < frac < 0.45


def test_tsvm_definition():
    taus = _taus(count=3, shape=(12, 20))
    got = get_euclidean("tsvm")(taus, [1 / 3] * 3)
    k = 12 // 3
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat, v_cat, s_cat = torch.cat(us, 1), torch.cat(vs, 1), torch.cat(ss)
    a, _, bh = torch.linalg.svd(u_cat, full_matrices=False)
    pu = a @ bh
    a, _, bh = torch.linalg.svd(v_cat, full_matrices=False)
    pv = a @ bh
    assert torch.allclose(got, pu @ torch.diag(s_cat) @ pv.T, atol=1e-12)


def test_tsvm_on_orthogonal_tasks_is_their_sum():
    """Tasks with mutually orthogonal singular vectors do not interfere: TSV-M returns the sum."""
    q1, _ = torch.linalg.qr(torch.randn(12, 12, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(20, 20, dtype=F64))
    # each task has rank k = 12 // 3 = 4 on its own block of directions
    taus = [sum((4.0 - j) * torch.outer(q1[:, 4 * i + j], q2[:, 4 * i + j]) for j in range(4)) for i in range(3)]
    got = get_euclidean("tsvm")(taus, [1 / 3] * 3)
    assert torch.allclose(got, sum(taus), atol=1e-12)


def test_tsvm_vector_falls_back_to_weighted_mean():
    taus = [torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3.0, -2.0], dtype=F64)]
    got = get_euclidean("tsvm")(taus, [0.25, 0.75])
    assert torch.allclose(got, 0.25 * taus[0] + 0.75 * taus[1])


def test_bad_options():
    taus = _taus()
    with pytest.raises(ConfigError):
        get_euclidean("ties")(taus, [1 / 3] * 3, density=0.0)
    with pytest.raises(ConfigError):
        get_euclidean("dare_ta")(taus, [1 / 3] * 3, p=1.0)
    with pytest.raises(ConfigError):
        get_euclidean("ta")(taus, [0.5, 0.5])
    with pytest.raises(ConfigError):
        get_euclidean("nope")


@pytest.mark.parametrize("name, kwargs", [("ta", {}), ("ta", {"lam": 0.7}), ("dare_ta", {"p": 0.3, "seed": 5})])
def test_linear_methods_stream_a_generator(name, kwargs):
    """``linear`` methods consume a generator once, holding at most the current and previous task
    vector, and give the same result as on a list (DARE: the same masks)."""
    import gc
    import weakref

    from peft_orthomerge.ops.registry import is_linear, merge_iter

    fn = get_euclidean(name)
    assert is_linear(fn)
    taus = _taus(count=4, shape=(30, 40))
    w = [0.4, 0.3, 0.2, 0.1]
    produced: list[weakref.ref] = []

    def lazily():
        for t in taus:
            gc.collect()
            assert all(r() is None for r in produced[:-1]), "an earlier task vector is still alive"
            copy = t.clone()
            produced.append(weakref.ref(copy))
            yield copy
            del copy

    got = merge_iter(fn, lazily(), w, **kwargs)
    assert len(produced) == 4
    want = fn(taus, w, **kwargs)
    assert torch.allclose(got, want, atol=1e-14, rtol=0)
    if name == "dare_ta":  # the definition: per-task masks drawn in order from one seeded generator
        dropped = _dare_masks(taus, 0.3, 5)
        assert torch.allclose(got, sum(wi * 4 * d for wi, d in zip(w, dropped)) / 4, atol=1e-14)
    assert all(torch.equal(a, b) for a, b in zip(taus, _taus(count=4, shape=(30, 40))))  # inputs untouched
    with pytest.raises(ConfigError):
        fn(iter(taus[:3]), w, **kwargs)
    with pytest.raises(ConfigError):
        fn(iter(taus), w[:3], **kwargs)


def test_non_linear_methods_get_a_list():
    from peft_orthomerge.ops.registry import is_linear, merge_iter

    taus = _taus(shape=(6, 10))
    for name in ("ties", "dare_ties", "tsvm"):
        fn = get_euclidean(name)
        assert not is_linear(fn)
        assert torch.equal(merge_iter(fn, iter(taus), [1 / 3] * 3), fn(taus, [1 / 3] * 3))
