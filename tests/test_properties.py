"""Property-based tests (hypothesis) of the I/O round trip and of the mathematics.

Examples are few and small (the suite must stay fast on two shared cores); every property is
checked against an independent float64 computation, never against the function under test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.tuners.oft.layer import OFTRotationModule

from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops.cayley import cayley, inverse_cayley
from peft_orthomerge.ops.decouple import decouple_merge, iter_procrustes, procrustes_rotation
from peft_orthomerge.ops.procrustes import polar
from peft_orthomerge.ops.skew import (
    from_canonical,
    neumann_rotation,
    skew_to_vec,
    to_canonical,
    vec_to_skew,
)
from peft_orthomerge.ops.so_merge import merge_module
from peft_orthomerge.ops.weights import normalize_weights
from peft_orthomerge.sinks.output import ShardedSafetensorsWriter, atomic_output_dir, finalize_shards
from peft_orthomerge.sources.tensors import TensorReader

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]


# --------------------------------------------------------------------------------------------
# I/O: whatever is written through the sharded writer reads back bit for bit
# --------------------------------------------------------------------------------------------
@st.composite
def tensor_dicts(draw):
    n = draw(st.integers(1, 6))
    names = draw(
        st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True), min_size=n, max_size=n, unique=True)
    )
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 10
        out[name] = t.round().to(dtype) if dtype == torch.int64 else t.to(dtype)
    return out


@SETTINGS
@given(tensors=tensor_dicts(), max_shard_bytes=st.integers(1, 400))
def test_sharded_write_reads_back_exactly(tensors, max_shard_bytes):
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        with atomic_output_dir(out) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
            for name, t in tensors.items():
                writer.add(name, t)
            parts = writer.close()
            finalize_shards(tmp, parts)
        reader = TensorReader.from_dir(out, "model")
        assert sorted(reader.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = reader.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t)
        n_files = len(list(out.glob("model*.safetensors")))
        assert n_files == len(parts)
        assert (out / "model.safetensors.index.json").is_file() == (len(parts) > 1)
        assert [p.name for p in Path(root).iterdir()] == ["out"]  # nothing temporary left


# --------------------------------------------------------------------------------------------
# task weights
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(raw=st.lists(st.floats(0.0, 1e300, allow_subnormal=False), min_size=1, max_size=6).filter(lambda w: sum(w) > 0))
def test_normalized_weights_are_proportional_and_sum_to_one(raw):
    w = normalize_weights(raw, len(raw))
    assert abs(sum(w) - 1.0) < 1e-12 and all(x >= 0 for x in w)
    top = max(range(len(raw)), key=raw.__getitem__)
    for x, r in zip(w, raw):
        assert abs(x * raw[top] - r * w[top]) <= 1e-12 * raw[top]


@pytest.mark.parametrize("raw", [[0.0, 0.0], [1.0, -0.5], [1.0, float("nan")], [float("inf"), 1.0], ["a", 1.0], [1.0]])
def test_bad_weights_are_config_errors(raw):
    with pytest.raises(ConfigError):
        normalize_weights(raw, 2)


@pytest.mark.parametrize("raw", [[1e308, 1e308], [1e308, 1.0, 1e308]])
def test_huge_finite_weights_do_not_overflow(raw):
    w = normalize_weights(raw, len(raw))
    assert abs(sum(w) - 1.0) < 1e-12


# --------------------------------------------------------------------------------------------
# OFT mathematics (peft_orthomerge.ops.skew, peft_orthomerge.ops.so_merge)
# --------------------------------------------------------------------------------------------


def dense_skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Independent reference: row k of ``vec`` fills the strict upper triangle of block k row by row
    (the order of ``torch.triu_indices``); ``Q = U - U^T``."""
    out = torch.zeros(vec.shape[0], b, b, dtype=torch.float64)
    for k in range(vec.shape[0]):
        pos = 0
        for i in range(b):
            for j in range(i + 1, b):
                out[k, i, j] = float(vec[k, pos])
                out[k, j, i] = -float(vec[k, pos])
                pos += 1
    return out


def peft_R(stored: torch.Tensor, b: int, use_cayley_neumann: bool, terms: int = 5) -> torch.Tensor:
    """The rotation blocks PEFT itself builds from a stored vector (its own code, in float64)."""
    mod = OFTRotationModule(stored.shape[0], stored.shape[1], b, b * stored.shape[0])
    return mod._cayley_batch(stored.to(torch.float64), b, use_cayley_neumann, terms)


def exact_cayley_ref(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 with explicit inverses, block by block."""
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return torch.stack([(eye + qk) @ torch.linalg.inv(eye - qk) for qk in q])


@st.composite
def skew_vectors(draw, max_norm: float = 0.6):
    b = draw(st.sampled_from([2, 3, 4, 8]))
    r = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-4, max_norm))
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(r, b * (b - 1) // 2, generator=g, dtype=torch.float64)
    return b, vec * (scale / max(float(vec.norm()), 1e-12))


@st.composite
def task_sets(draw, n_min: int = 1, n_max: int = 4):
    b, first = draw(skew_vectors())
    n = draw(st.integers(n_min, n_max))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    vecs = [first] + [
        torch.randn(first.shape, generator=g, dtype=torch.float64) * draw(st.floats(1e-3, 0.3)) for _ in range(n - 1)
    ]
    raw = draw(st.lists(st.floats(0.05, 10.0), min_size=n, max_size=n))
    return b, vecs, raw


@SETTINGS
@given(data=skew_vectors(max_norm=2.0), flag=st.booleans())
def test_exact_cayley_round_trip_in_both_conventions(data, flag):
    """Stored vector -> canonical -> exact Cayley -> inverse Cayley -> stored vector.

    For the exact flag the rotation must be the one PEFT builds; for the Neumann flag the exact
    Cayley map of the canonical vector is the limit PEFT's series truncates."""
    b, stored = data
    canonical = to_canonical(stored, flag)
    assert torch.allclose(vec_to_skew(canonical, b), dense_skew(canonical, b), atol=0, rtol=0)
    rot = cayley(vec_to_skew(canonical, b))
    assert torch.allclose(rot, exact_cayley_ref(dense_skew(canonical, b)), atol=1e-12)
    if not flag:
        assert torch.allclose(rot, peft_R(stored, b, False), atol=1e-12)
    back = from_canonical(skew_to_vec(inverse_cayley(rot)), flag)
    assert torch.allclose(back, stored, atol=1e-11, rtol=1e-9)


@SETTINGS
@given(data=skew_vectors(max_norm=0.5), terms=st.integers(1, 9))
def test_neumann_rotation_is_peft_series(data, terms):
    b, stored = data
    ours = neumann_rotation(vec_to_skew(to_canonical(stored, True), b), terms)
    assert torch.allclose(ours, peft_R(stored, b, True, terms), atol=1e-13)


@SETTINGS
@given(data=skew_vectors(max_norm=0.05))
def test_neumann_and_exact_conventions_are_opposite(data):
    """The same stored vector read under the two flags gives (nearly) inverse rotations in PEFT:
    that is why flags must be reconciled before merging."""
    b, stored = data
    r_neumann = peft_R(stored, b, True, 9)
    r_exact = peft_R(stored, b, False)
    eye = torch.eye(b, dtype=torch.float64).expand_as(r_exact)
    assert torch.allclose(r_neumann @ r_exact, eye, atol=1e-8)
    canon_n = to_canonical(stored, True)
    canon_e = to_canonical(stored, False)
    assert torch.allclose(cayley(vec_to_skew(canon_n, b)), exact_cayley_ref(dense_skew(stored, b)), atol=1e-12)
    assert torch.allclose(cayley(vec_to_skew(canon_e, b)), peft_R(stored, b, False), atol=1e-12)


def _norm(vec: torch.Tensor, b: int) -> float:
    return float(torch.linalg.matrix_norm(dense_skew(vec, b)).square().sum().sqrt())


@SETTINGS
@given(data=task_sets(), granularity=st.sampled_from(["module", "block"]))
def test_merged_norm_is_weighted_mean_of_norms(data, granularity):
    b, vecs, raw = data
    w = normalize_weights(raw, len(vecs))
    out = merge_module(vecs, w, method="orthomerge", granularity=granularity)
    s = sum(wi * dense_skew(v, b) for wi, v in zip(w, vecs))
    merged = dense_skew(out.vec, b)
    if granularity == "module":
        target = sum(wi * _norm(v, b) for wi, v in zip(w, vecs))
        assert abs(float(torch.linalg.matrix_norm(merged).square().sum().sqrt()) - target) <= 1e-10 * max(1.0, target)
        assert torch.allclose(
            merged, s * (target / float(torch.linalg.matrix_norm(s).square().sum().sqrt())), atol=1e-12
        )
        assert abs(out.merged_norm - target) <= 1e-10 * max(1.0, target)
    else:
        for k in range(s.shape[0]):
            target_k = sum(wi * float(torch.linalg.matrix_norm(dense_skew(v, b)[k])) for wi, v in zip(w, vecs))
            assert abs(float(torch.linalg.matrix_norm(merged[k])) - target_k) <= 1e-10 * max(1.0, target_k)


@SETTINGS
@given(
    data=skew_vectors(),
    n=st.integers(1, 5),
    method=st.sampled_from(["orthomerge", "mean_q", "karcher"]),
    granularity=st.sampled_from(["module", "block"]),
)
def test_n_copies_of_one_adapter_return_it(data, n, method, granularity):
    b, vec = data
    out = merge_module([vec.clone() for _ in range(n)], [1.0 / n] * n, method=method, granularity=granularity)
    assert torch.allclose(out.vec, vec, atol=1e-10, rtol=1e-9)


@SETTINGS
@given(
    data=skew_vectors(),
    raw=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=4),
    method=st.sampled_from(["orthomerge", "mean_q"]),
)
def test_one_adapter_merged_with_itself_at_any_weights_is_unchanged(data, raw, method):
    b, vec = data
    w = normalize_weights(raw, len(raw))
    out = merge_module([vec] * len(raw), w, method=method)
    assert torch.allclose(out.vec, vec, atol=1e-12, rtol=1e-10)


@SETTINGS
@given(
    data=task_sets(n_min=2),
    perm_seed=st.integers(0, 1000),
    method=st.sampled_from(["orthomerge", "mean_q", "mean_r", "karcher"]),
)
def test_order_does_not_matter(data, perm_seed, method):
    b, vecs, raw = data
    w = normalize_weights(raw, len(vecs))
    perm = torch.randperm(len(vecs), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a = merge_module(vecs, w, method=method)
    c = merge_module([vecs[i] for i in perm], [w[i] for i in perm], method=method)
    if a.vec is None:
        assert torch.allclose(a.rotation, c.rotation, atol=1e-12)
    else:
        assert torch.allclose(a.vec, c.vec, atol=1e-9)
    assert abs(a.merged_norm - c.merged_norm) <= 1e-9 * max(1.0, a.merged_norm)


@SETTINGS
@given(
    data=task_sets(),
    scale=st.floats(0.1, 3.0),
    method=st.sampled_from(["orthomerge", "mean_q", "product_r", "karcher"]),
)
def test_merged_rotation_is_orthogonal_with_the_exact_flag(data, scale, method):
    b, vecs, raw = data
    w = normalize_weights(raw, len(vecs))
    out = merge_module(vecs, w, method=method, scale=scale)
    stored = from_canonical(out.vec, False)  # what an exact-flag adapter stores
    rot = peft_R(stored, b, False)
    eye = torch.eye(b, dtype=torch.float64)
    assert float((rot.transpose(-2, -1) @ rot - eye).abs().max()) < 1e-6
    assert torch.isfinite(out.vec).all()


@SETTINGS
@given(data=skew_vectors(), granularity=st.sampled_from(["module", "block"]))
def test_exact_cancellation_is_identity_never_nan(data, granularity):
    b, vec = data
    out = merge_module([vec, -vec], [0.5, 0.5], method="orthomerge", granularity=granularity)
    assert torch.equal(out.vec, torch.zeros_like(vec)) and out.magnitude_factor is None
    zero = merge_module([torch.zeros_like(vec)] * 3, [1 / 3] * 3, granularity=granularity)
    assert torch.equal(zero.vec, torch.zeros_like(vec))


# --------------------------------------------------------------------------------------------
# Procrustes and decoupling (peft_orthomerge.ops.procrustes, peft_orthomerge.ops.decouple)
# --------------------------------------------------------------------------------------------
def random_rotation(n: int, g: torch.Generator, angle_scale: float = 1.0) -> torch.Tensor:
    """A rotation in SO(n) away from -1 eigenvalues: the exact Cayley map of a random skew matrix."""
    a = torch.randn(n, n, generator=g, dtype=torch.float64) * angle_scale
    q = (a - a.T) / 2
    eye = torch.eye(n, dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


@st.composite
def weight_shapes(draw, deficient: bool | None = None):
    out = draw(st.integers(2, 9))
    n = draw(st.integers(2, 9))
    if deficient is True:
        n = max(n, out + 1)
    elif deficient is False:
        out = max(out, n)
    return out, n, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(shape=weight_shapes(deficient=False), solver=st.sampled_from(["svd", "newton_schulz", "auto"]))
def test_procrustes_recovers_a_known_rotation(shape, solver):
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64) + 2 * torch.eye(out, n, dtype=torch.float64)
    p_true = random_rotation(n, g, 0.7)
    p = procrustes_rotation(w0, w0 @ p_true, solver=solver)
    assert torch.allclose(p, p_true, atol=1e-7), float((p - p_true).abs().max())
    assert abs(float(torch.linalg.det(p)) - 1.0) < 1e-9


@SETTINGS
@given(shape=weight_shapes(deficient=True), solver=st.sampled_from(["svd", "newton_schulz"]))
def test_procrustes_rank_deficient_is_optimal_and_closest_to_identity(shape, solver):
    """out < in: many rotations are optimal; the one returned fits exactly, lies in SO(in), and is no
    farther from I than the rotation the target was built with (itself optimal)."""
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64)
    p_true = random_rotation(n, g, 0.7)
    p = procrustes_rotation(w0, w0 @ p_true, solver=solver)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(p.T @ p, eye, atol=1e-9)
    assert abs(float(torch.linalg.det(p)) - 1.0) < 1e-9
    assert torch.allclose(w0 @ p, w0 @ p_true, atol=1e-8)
    assert float(torch.linalg.matrix_norm(p - eye)) <= float(torch.linalg.matrix_norm(p_true - eye)) + 1e-8


@SETTINGS
@given(shape=weight_shapes(), solver=st.sampled_from(["svd", "newton_schulz"]))
def test_base_against_itself_gives_the_identity(shape, solver):
    """Without the ``torch.equal`` shortcut: the formula itself must return P = I (any rank)."""
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64)
    ((rot, _),) = list(iter_procrustes(w0, [w0.clone()], solver=solver))
    assert torch.allclose(rot.dense(), torch.eye(n, dtype=torch.float64), atol=1e-8)


@SETTINGS
@given(
    shape=weight_shapes(),
    n_experts=st.integers(1, 3),
    target=st.sampled_from(["global", "conflict", None]),
    residual=st.sampled_from(["ta", "ties", "tsvm"]),
)
def test_decoupling_is_the_identity_on_the_base(shape, n_experts, target, residual):
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64)
    merged, _ = decouple_merge(
        w0, [w0.clone() for _ in range(n_experts)], [1.0 / n_experts] * n_experts, target=target, residual=residual
    )
    assert torch.allclose(merged, w0, atol=1e-10)


@SETTINGS
@given(shape=weight_shapes(), n_copies=st.integers(1, 4), target=st.sampled_from(["global", "conflict", None]))
def test_n_copies_of_one_expert_return_it(shape, n_copies, target):
    """Task arithmetic with its default lambda = 1/N: N copies of W1 merge back to W1."""
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64)
    w1 = w0 + 0.1 * torch.randn(out, n, generator=g, dtype=torch.float64)
    merged, _ = decouple_merge(w0, [w1] * n_copies, [1.0 / n_copies] * n_copies, target=target)
    assert torch.allclose(merged, w1, atol=1e-8)


@SETTINGS
@given(shape=weight_shapes(), perm_seed=st.integers(0, 100), target=st.sampled_from(["global", "conflict"]))
def test_decoupled_merge_does_not_depend_on_input_order(shape, perm_seed, target):
    out, n, seed = shape
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=g, dtype=torch.float64)
    experts = [w0 + 0.1 * torch.randn(out, n, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a, _ = decouple_merge(w0, experts, weights, target=target)
    b, _ = decouple_merge(w0, [experts[i] for i in perm], [weights[i] for i in perm], target=target)
    assert torch.allclose(a, b, atol=1e-9)


@SETTINGS
@given(
    n=st.integers(2, 12),
    seed=st.integers(0, 2**31 - 1),
    log_cond=st.floats(0.0, 8.0),
    solver=st.sampled_from(["svd", "newton_schulz", "auto"]),
)
def test_polar_factor_is_certified(n, seed, log_cond, solver):
    """Any solver returns the true polar factor (the SVD's) to a stated accuracy, even ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -log_cond, n, dtype=torch.float64)
    a = u @ torch.diag(s) @ v.T
    res = polar(a, solver)
    assert torch.allclose(res.factor, u @ v.T, atol=1e-7)
    assert res.orthogonality_error < 1e-9
