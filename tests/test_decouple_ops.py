"""`ops.decouple` against an independent dense float64 implementation (full SVDs, explicit formulas).

The reference works in the full ``in x in`` space with explicit inverses, no reduced basis, no
batching, no shortcuts: if the library's reduced-basis / Newton-Schulz path is wrong anywhere,
these disagree.
"""

from __future__ import annotations

import pytest
import torch
from _lora_utils import single_thread  # noqa: F401  (autouse fixture)
from conftest import build_tiny_llama

from peft_orthomerge.errors import ConfigError, IncompatibleInputsError, NumericalError
from peft_orthomerge.ops import closest_polar, registry
from peft_orthomerge.ops.cayley import cayley_apply, cayley_apply_leading, inverse_cayley_lu
from peft_orthomerge.ops.closest_polar import complete_qr, polar_near_orthogonal
from peft_orthomerge.ops.decouple import decouple_merge, iter_procrustes, procrustes_batch, procrustes_rotation

F64 = torch.float64


# -- independent reference -------------------------------------------------------------------------


def ref_rotation(w0: torch.Tensor, wt: torch.Tensor, rtol: float = 1e-11) -> torch.Tensor:
    """Closest-to-identity optimal P in SO(n): full SVD of M, polar of the complement block, det fix."""
    m = w0.T @ wt
    n = m.shape[0]
    u, s, vh = torch.linalg.svd(m)
    v = vh.T
    k = int((s > rtol * s[0]).sum())
    p = u[:, :k] @ v[:, :k].T
    if k < n:
        c = u[:, k:].T @ v[:, k:]
        uz, _, vzh = torch.linalg.svd(c)
        z = uz @ vzh
        if torch.linalg.det(p + u[:, k:] @ z @ v[:, k:].T) < 0:
            uz[:, -1] *= -1
            z = uz @ vzh
        p = p + u[:, k:] @ z @ v[:, k:].T
    elif torch.linalg.det(p) < 0:
        u[:, -1] *= -1
        p = u @ vh
    return p


def ref_merge(w0, experts, weights, target="global", lam=None):
    """Paper Algorithm 2 with TA residuals, written out densely in float64."""
    w0 = w0.to(F64)
    experts = [e.to(F64) for e in experts]
    n = w0.shape[1]
    eye = torch.eye(n, dtype=F64)
    taus = [e - w0 for e in experts]
    mean_tau = sum(w * t for w, t in zip(weights, taus))
    qs, rhos = [], []
    for e, t in zip(experts, taus):
        if target == "conflict":
            rows = []
            for r in range(t.shape[0]):
                denom = t[r].norm() * mean_tau[r].norm()
                cos = float(t[r] @ mean_tau[r] / denom) if denom > 0 else 0.0
                rows.append(1.0 if cos < 0 else 0.0)
            tgt = w0 + t * torch.tensor(rows, dtype=F64)[:, None]
        else:
            tgt = e
        p = eye.clone() if torch.equal(tgt, w0) else ref_rotation(w0, tgt)
        qs.append((p - eye) @ torch.linalg.inv(p + eye))
        rhos.append(e - w0 @ p)
    s = sum(w * q for w, q in zip(weights, qs))
    total = sum(w * float(torch.linalg.matrix_norm(q)) for w, q in zip(weights, qs))
    snorm = float(torch.linalg.matrix_norm(s))
    q = s * (total / snorm) if snorm > 1e-12 * max(total, 1e-300) else torch.zeros_like(s)
    p = (eye + q) @ torch.linalg.inv(eye - q)
    count = len(experts)
    lam = 1.0 / count if lam is None else lam
    rho = lam * sum(count * w * r for w, r in zip(weights, rhos))
    return w0 @ p + rho


def _pair(out, n, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=gen, dtype=F64) / n**0.5
    return w0, w0 + noise * torch.randn(out, n, generator=gen, dtype=F64) / n**0.5


# shapes of the tiny Llama: k/v (16, 64), q/o (64, 64), gate/up (160, 64), down (64, 160); (32, 64): 2 out = in, (40, 64): in/2 < out < in
SHAPES = [(16, 64), (32, 64), (40, 64), (64, 64), (160, 64), (64, 160)]


@pytest.mark.parametrize("solver", ["svd", "newton_schulz"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rotation_matches_reference_and_svd_optimum(shape, solver):
    w0, wt = _pair(*shape, 0.3, 1)
    p = procrustes_rotation(w0, wt, solver=solver)
    ref = ref_rotation(w0, wt)
    n = shape[1]
    assert torch.allclose(p, ref, atol=1e-9)
    assert float(torch.linalg.matrix_norm(p.T @ p - torch.eye(n, dtype=F64))) < 1e-11
    assert float(torch.linalg.det(p)) == pytest.approx(1.0, abs=1e-9)
    # objective equals the unconstrained SVD optimum ||Wt||^2 + ||W0||^2 - 2 sum(sigma)
    sig = torch.linalg.svdvals(w0.T @ wt)
    opt = (wt.norm() ** 2 + w0.norm() ** 2 - 2 * sig.sum()).clamp_min(0).sqrt()
    assert float(torch.linalg.matrix_norm(wt - w0 @ p)) == pytest.approx(float(opt), abs=1e-9)


@pytest.mark.parametrize("shape", [(16, 64), (64, 160)])
def test_rank_deficient_choice_is_closest_to_identity(shape):
    w0, wt = _pair(*shape, 0.3, 2)
    p = procrustes_rotation(w0, wt, solver="svd")
    u, s, vh = torch.linalg.svd(w0.T @ wt)
    k = shape[0]
    n = shape[1]
    eye = torch.eye(n, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    best = float(torch.linalg.matrix_norm(p - eye))
    for _ in range(5):  # other optimal rotations (arbitrary map between the null spaces) are farther from I
        z, _ = torch.linalg.qr(torch.randn(n - k, n - k, generator=gen, dtype=F64))
        other = u[:, :k] @ vh[:k] + u[:, k:] @ z @ vh[k:]
        assert float(torch.linalg.matrix_norm(wt - w0 @ other)) == pytest.approx(
            float(torch.linalg.matrix_norm(wt - w0 @ p)), abs=1e-9
        )
        assert float(torch.linalg.matrix_norm(other - eye)) > best
    # the plain SVD answer U V^T is far from identity; ours is not
    assert float(torch.linalg.matrix_norm(u @ vh - eye)) > 2 * best


@pytest.mark.parametrize("solver", ["svd", "newton_schulz"])
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_recovery_without_shortcut(shape, solver):
    """W0 against itself: the formula (no equality shortcut) gives P = I, also on k/v and down_proj."""
    w0, _ = _pair(*shape, 0.0, 3)
    rots, info = procrustes_batch(w0, w0[None].clone(), solver=solver)
    eye = torch.eye(shape[1], dtype=F64)
    assert float(torch.linalg.matrix_norm(rots[0].dense() - eye)) < 1e-10
    assert info.orthogonality_error < 1e-11
    assert torch.equal(procrustes_rotation(w0, w0.clone()), eye)


def test_merging_base_copies_gives_base_exactly():
    model = build_tiny_llama()
    w0 = model.model.layers[0].self_attn.k_proj.weight.detach()
    for target in ("global", "conflict", None):
        merged, stats = decouple_merge(w0, [w0.clone(), w0.clone()], [0.5, 0.5], target)
        assert torch.equal(merged.to(w0.dtype), w0)
        assert stats.skew_norms in ([], [0.0, 0.0])


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("solver", ["svd", "newton_schulz"])
def test_decouple_merge_matches_reference_on_tiny_llama(target, solver):
    base = build_tiny_llama(seed=0)
    experts = [build_tiny_llama(seed=s) for s in (1, 2, 3)]
    weights = [0.5, 0.3, 0.2]
    names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
    ]
    layer = base.model.layers[0]
    for name in names:
        w0 = layer.get_submodule(name).weight.detach().to(F64)
        t1, t2 = (0.05 * e.model.layers[0].get_submodule(name).weight.detach().to(F64) for e in experts[:2])
        ws = [w0 + t1, w0 + t2, w0 - 1.5 * t1 + 0.3 * t2]  # the third conflicts with the mean on most rows
        got, stats = decouple_merge(w0, ws, weights, target, "ta", solver=solver, name=name)
        ref = ref_merge(w0, ws, weights, target)
        assert torch.allclose(got, ref, atol=1e-9, rtol=0), name
        assert len(stats.residual_norms) == 3 and stats.solver == solver
        if target == "conflict":
            assert 0 < sum(stats.rows_kept) < 3 * w0.shape[0]


def test_ta_lambda_and_target_none():
    w0, w1 = _pair(16, 64, 0.2, 4)
    _, w2 = _pair(16, 64, 0.2, 5)
    got, _ = decouple_merge(w0, [w1, w2], [0.5, 0.5], "global", "ta", {"lam": 0.7})
    assert torch.allclose(got, ref_merge(w0, [w1, w2], [0.5, 0.5], "global", lam=0.7), atol=1e-10)
    plain, stats = decouple_merge(w0, [w1, w2], [0.25, 0.75], None)
    assert torch.allclose(plain, w0 + 0.25 * (w1 - w0) + 0.75 * (w2 - w0), atol=1e-14)
    assert stats.solver == "none"


def test_stats_are_consistent():
    w0, w1 = _pair(40, 64, 0.3, 6)
    _, w2 = _pair(40, 64, 0.3, 7)
    _, stats = decouple_merge(w0, [w1, w2], [0.5, 0.5], "global")
    for w, tau_norm, rho_norm in zip((w1, w2), stats.task_vector_norms, stats.residual_norms):
        p = ref_rotation(w0, w)
        assert tau_norm == pytest.approx(float((w - w0).norm()), rel=1e-12)
        assert rho_norm == pytest.approx(float((w - w0 @ p).norm()), rel=1e-8)
    assert stats.magnitude_factor is not None and stats.magnitude_factor >= 1.0
    extra = stats.as_extra()
    assert {"orth_part_norm_0", "residual_norm_1", "task_vector_norm_0", "solver_error"} <= set(extra)
    _, conflict = decouple_merge(w0, [w1, 2 * w0 - w1], [0.7, 0.3], "conflict")
    kept = conflict.as_extra()
    assert kept["rows_kept_0"] == 0 and kept["rows_kept_1"] == 40  # the second expert opposes the mean on every row


def test_half_turn_raises_numerical_error_naming_module():
    w0 = torch.eye(4, dtype=F64)
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(NumericalError, match="layers.3.q_proj"):
        decouple_merge(w0, [half_turn], [1.0], "global", name="layers.3.q_proj")


def test_bad_arguments():
    w0, w1 = _pair(8, 16, 0.1, 8)
    with pytest.raises(IncompatibleInputsError):
        decouple_merge(w0, [w1[:, :8]], [1.0], "global")
    with pytest.raises(ConfigError):
        decouple_merge(w0, [w1], [1.0], "sideways")
    with pytest.raises(ConfigError):
        decouple_merge(w0, [w1], [1.0], "global", "nope")
    with pytest.raises(ConfigError):
        decouple_merge(w0, [w1], [1.0], "global", solver="quintic")
    bad = w1.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(NumericalError, match="mlp.up_proj"):
        decouple_merge(w0, [w1, bad], [0.5, 0.5], "global", name="mlp.up_proj")


# -- the reduced-basis SVD path: factored cores, frame coordinates, LU-based Cayley maps -------------


def _dense_inverse_cayley(p):
    eye = torch.eye(p.shape[0], dtype=F64)
    return (p - eye) @ torch.linalg.inv(p + eye)


@pytest.mark.parametrize("shape", [(16, 64), (64, 160), (8, 64)])
def test_factored_rotation_pieces_match_dense_formulas(shape):
    w0, wt = _pair(*shape, 0.3, 9)
    ((rot, info),) = list(iter_procrustes(w0, [wt], solver="svd"))
    assert rot.factors is not None and rot.core is None and rot.frame is not None
    ref = ref_rotation(w0, wt)
    assert torch.allclose(rot.dense(), ref, atol=1e-9)
    assert torch.allclose(rot.rotate_base(w0), w0 @ ref, atol=1e-9)
    assert torch.allclose(rot.apply(wt), wt @ ref, atol=1e-9)
    q_ref = _dense_inverse_cayley(ref)
    assert torch.allclose(rot.skew(), q_ref, atol=1e-8)
    # accumulation in frame coordinates equals F^T Q F
    acc = torch.zeros(shape[1], shape[1], dtype=F64)
    rot.add_skew_in_frame(acc, rot.skew_core(), 0.7)
    frame = rot.frame.dense()
    assert torch.allclose(acc, 0.7 * frame.T @ q_ref @ frame, atol=1e-8)
    assert info.orthogonality_error < 1e-11


def test_complete_qr_determinant_from_reflectors():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, generator=gen, dtype=F64)
    for mat in (x, x[:, [1, 0, 2, 3, 4]], -x):
        y, r, det = complete_qr(mat)
        assert torch.allclose(y[:, :5] @ r, mat, atol=1e-12)
        assert torch.allclose(y.T @ y, torch.eye(12, dtype=F64), atol=1e-12)
        assert det == pytest.approx(float(torch.linalg.det(y)), abs=1e-9)
    # an already-triangular column gives tau = 0 (an identity factor, det +1), still correct
    tri = torch.zeros(6, 2, dtype=F64)
    tri[0, 0], tri[0, 1], tri[1, 1] = 2.0, 1.0, 3.0
    y, _, det = complete_qr(tri)
    assert det == pytest.approx(float(torch.linalg.det(y)), abs=1e-12)


def test_reduced_path_falls_back_when_target_rank_deficient():
    """rank(W0^T T) < out: the factored path declines and the dense m x m closest-polar SVD answers."""
    w0, wt = _pair(16, 64, 0.3, 10)
    wt[12:] = wt[:4]  # rank 12 < 16 rows
    ((rot, _),) = list(iter_procrustes(w0, [wt], solver="svd"))
    assert rot.factors is None and rot.core is not None
    ref = ref_rotation(w0, wt)
    assert torch.allclose(rot.dense(), ref, atol=1e-9)
    got, _ = decouple_merge(w0, [wt, _pair(16, 64, 0.3, 11)[1]], [0.5, 0.5], "global", solver="svd")
    assert torch.allclose(got, ref_merge(w0, [wt, _pair(16, 64, 0.3, 11)[1]], [0.5, 0.5]), atol=1e-9)


def test_factored_inverse_cayley_and_cayley_apply():
    gen = torch.Generator().manual_seed(12)
    y, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    a = torch.randn(6, 6, generator=gen, dtype=F64)
    p = torch.linalg.matrix_exp(0.3 * (a - a.T))
    q = inverse_cayley_lu(p @ y, right=y)  # P = (P Y) Y^T given factored
    assert torch.allclose(q, _dense_inverse_cayley(p), atol=1e-12)
    half = torch.diag(torch.tensor([-1.0, -1.0, 1, 1, 1, 1], dtype=F64))
    with pytest.raises(NumericalError, match="mlp.down_proj"):
        inverse_cayley_lu(half @ y, right=y, name="mlp.down_proj")
    w = torch.randn(3, 6, generator=gen, dtype=F64)
    s = q.clone()
    eye = torch.eye(6, dtype=F64)
    expected = w @ (eye + 1.5 * q) @ torch.linalg.inv(eye - 1.5 * q)
    assert torch.allclose(cayley_apply(w, s, 1.5), expected, atol=1e-12)


@pytest.mark.parametrize("target", ["global", "conflict", None])
@pytest.mark.parametrize("shape", [(16, 64), (160, 64)])  # reduced basis (2 out < in) and the dense core
@pytest.mark.parametrize("method", ["ta", "dare_ta"])
def test_streamed_residuals_match_the_list_path(monkeypatch, target, shape, method):
    """A linear method consumes the residuals as a generator (one at a time); the same method fed
    a list (as non-linear methods are) gives the same merge. Experts come in float32 storage."""
    fn = registry.get_euclidean(method)
    seen: list[type] = []

    def streamed(task_vectors, weights, **kwargs):
        seen.append(type(task_vectors))
        return fn(task_vectors, weights, **kwargs)

    def listed(task_vectors, weights, **kwargs):
        seen.append(type(task_vectors))
        return fn(list(task_vectors), weights, **kwargs)

    streamed.linear, listed.linear = True, False  # as register_euclidean marks them; not registered for good
    monkeypatch.setitem(registry._METHODS, "probe_stream", streamed)
    monkeypatch.setitem(registry._METHODS, "probe_list", listed)
    w0, w1 = _pair(*shape, 0.3, 21)
    _, w2 = _pair(*shape, 0.3, 22)
    w0, experts = (
        w0.float(),
        [w1.float(), w0.float().clone(), (2 * w0 - w1).float(), w2.float()],
    )  # one expert is the base
    weights = [0.4, 0.1, 0.2, 0.3]

    def run(residual):
        gen = torch.Generator().manual_seed(5)
        return decouple_merge(
            w0, experts, weights, target, residual, {"p": 0.3} if method == "dare_ta" else None, generator=gen
        )

    got, got_stats = run("probe_stream")
    want, want_stats = run("probe_list")
    assert seen[0] is not list and seen[1] is list
    assert got.dtype == F64
    assert float(torch.linalg.matrix_norm(got - want)) <= 1e-12 * float(torch.linalg.matrix_norm(want))
    assert got_stats.residual_norms == pytest.approx(want_stats.residual_norms, rel=1e-12)
    assert len(got_stats.residual_norms) == 4 and got_stats.residual_norms[1] == 0.0
    # converting the experts to float64 up front changes nothing
    ref, _ = decouple_merge(
        w0.to(F64),
        [e.to(F64) for e in experts],
        weights,
        target,
        "probe_list",
        {"p": 0.3} if method == "dare_ta" else None,
        generator=torch.Generator().manual_seed(5),
    )
    assert float(torch.linalg.matrix_norm(ref - want)) <= 1e-12 * float(torch.linalg.matrix_norm(want))
    if method == "ta":  # and both agree with the plain dense formula
        dense = [e.to(F64) for e in experts]
        plain = w0.to(F64) + sum(w * (e - w0.to(F64)) for w, e in zip(weights, dense))
        expected = plain if target is None else ref_merge(w0, experts, weights, target)
        assert torch.allclose(got, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("shape", [(16, 64), (64, 160), (8, 64)])
def test_reduced_ta_fast_path_matches_explicit_residuals(monkeypatch, target, shape):
    """Task arithmetic with 2 out < in never forms rho_i; the explicit-residual path (the same TA
    registered under another name) gives the same merge and the same report numbers, which also
    match the dense definitions (||W0 P_i - W0||, ||W_i - W0 P_i||). Non-uniform weights,
    lam != 1/N, an expert equal to the base, one opposing the mean (conflict rows)."""
    fn = registry.get_euclidean("ta")

    def explicit(task_vectors, weights, **kwargs):
        return fn(task_vectors, weights, **kwargs)

    explicit.linear = True
    monkeypatch.setitem(registry._METHODS, "explicit_ta", explicit)
    w0, w1 = _pair(*shape, 0.3, 31)
    _, w2 = _pair(*shape, 0.3, 32)
    experts = [w1, w0.clone(), 2 * w0 - w1, w2]
    weights = [0.4, 0.1, 0.2, 0.3]
    for lam in (None, 0.7):
        got, gs = decouple_merge(w0, experts, weights, target, "ta", {"lam": lam})
        want, ws = decouple_merge(w0, experts, weights, target, "explicit_ta", {"lam": lam})
        assert float(torch.linalg.matrix_norm(got - want)) <= 1e-12 * float(torch.linalg.matrix_norm(want))
        assert torch.allclose(got, ref_merge(w0, experts, weights, target, lam=lam), atol=1e-9, rtol=0)
        for key in ("residual_norms", "orth_part_norms", "skew_norms", "task_vector_norms"):
            assert getattr(gs, key) == pytest.approx(getattr(ws, key), rel=1e-10, abs=1e-12), key
        assert gs.rows_kept == ws.rows_kept and gs.merged_skew_norm == pytest.approx(ws.merged_skew_norm, rel=1e-12)
        assert gs.residual_norms[1] == 0.0 and gs.orth_part_norms[1] == 0.0
    if target == "conflict":
        assert 0 < sum(gs.rows_kept[i] for i in (0, 2, 3)) < 3 * shape[0]
    tau_mean = sum(w * (e - w0) for w, e in zip(weights, experts))
    for i, e in enumerate(experts):  # the report against the dense definitions
        tgt = e
        if target == "conflict":
            rows = torch.nn.functional.cosine_similarity(e - w0, tau_mean, dim=1) < 0
            tgt = w0 + (e - w0) * rows[:, None]
        p = torch.eye(shape[1], dtype=F64) if torch.equal(tgt, w0) else ref_rotation(w0, tgt)
        assert gs.orth_part_norms[i] == pytest.approx(float((w0 @ p - w0).norm()), rel=1e-8, abs=1e-12)
        assert gs.residual_norms[i] == pytest.approx(float((e - w0 @ p).norm()), rel=1e-8, abs=1e-12)


def test_reduced_ta_fast_path_float32_and_solvers():
    """float32 (norms summed in float64) and the Newton-Schulz core agree with the float64 reference."""
    w0, w1 = _pair(64, 160, 0.2, 33)
    _, w2 = _pair(64, 160, 0.2, 34)
    ref = ref_merge(w0, [w1, w2], [0.3, 0.7], "global")
    got, stats = decouple_merge(w0, [w1, w2], [0.3, 0.7], "global", dtype=torch.float32, solver="svd", rtol=1e-5)
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5
    _, s64 = decouple_merge(w0, [w1, w2], [0.3, 0.7], "global")
    assert stats.residual_norms == pytest.approx(s64.residual_norms, rel=1e-5)
    assert stats.orth_part_norms == pytest.approx(s64.orth_part_norms, rel=1e-5)
    ns, ns_stats = decouple_merge(w0, [w1, w2], [0.3, 0.7], "global", solver="newton_schulz")
    assert torch.allclose(ns, ref, atol=1e-9, rtol=0)
    assert ns_stats.residual_norms == pytest.approx(s64.residual_norms, rel=1e-9)


def _with_spectrum(s, seed):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=gen, dtype=F64))
    return (u * torch.tensor(s, dtype=F64)) @ v.T, u @ v.T


@pytest.mark.parametrize("method", ["newton_schulz", "eigh", None])
def test_near_orthogonal_polar_certified_or_declined(method):
    """Completion polar factor: singular values in [0.6, 1] give the SVD polar factor (fp64 and
    fp32); a singular value near 0 is declined (Newton-Schulz cannot certify it in its step
    budget, the eigh route refuses a squared condition number): None, the caller uses the SVD."""
    a, polar_a = _with_spectrum(torch.linspace(0.6, 1.0, 40).tolist(), 41)
    x = polar_near_orthogonal(a, method=method)
    assert x is not None and float((x - polar_a).norm()) < 1e-12
    assert float((x.T @ x - torch.eye(40, dtype=F64)).norm()) < 1e-12
    x32 = polar_near_orthogonal(a.float(), method=method)
    assert x32 is not None and float((x32.double() - polar_a).norm()) < 1e-4
    weak, _ = _with_spectrum([1e-6] + [1.0] * 39, 42)
    assert polar_near_orthogonal(weak, method=method) is None
    assert polar_near_orthogonal(weak.float(), method=method) is None


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(16, 64), (64, 160)])
def test_reduced_completion_newton_schulz_and_svd_branches(monkeypatch, shape, dtype):
    """The reduced path's completion Z: the Newton-Schulz factor when it is certified and gives
    det P = +1, else the SVD with the det fix on Z's weakest direction (or the SVD when Newton-Schulz
    declines). Every branch agrees with the dense reference; both natural branches occur."""
    made: list[torch.Tensor | None] = []
    real = closest_polar.polar_near_orthogonal

    def spy(a, *args, **kwargs):
        made.append(real(a, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(closest_polar, "polar_near_orthogonal", spy)
    used = []
    for seed in range(4):
        w0, wt = _pair(*shape, 0.3, 50 + seed)
        if seed % 2:  # a reflection inside the row space of W0: the optimum needs the det fix
            v = w0[0] / w0[0].norm()
            wt = wt - 2 * (wt @ v)[:, None] * v
        ((rot, _),) = list(iter_procrustes(w0.to(dtype), [wt.to(dtype)], solver="svd", rtol=1e-5))
        assert made[-1] is not None
        used.append(rot.factors[1] is made[-1])
        tol = 1e-9 if dtype == F64 else 1e-4
        assert torch.allclose(rot.dense().double(), ref_rotation(w0, wt), atol=tol)
        assert float(torch.linalg.det(rot.dense().double())) == pytest.approx(1.0, abs=tol)
    assert used == [True, False, True, False]
    monkeypatch.setattr(closest_polar, "polar_near_orthogonal", lambda a, *args, **kwargs: None)
    w0, wt = _pair(*shape, 0.3, 50)
    ((rot, _),) = list(iter_procrustes(w0, [wt], solver="svd"))
    assert torch.allclose(rot.dense(), ref_rotation(w0, wt), atol=1e-9)


@pytest.mark.parametrize("k, n", [(3, 8), (16, 40), (1, 5)])
def test_cayley_apply_leading_matches_dense_cayley(k, n):
    gen = torch.Generator().manual_seed(60 + k)
    a = torch.randn(7, k, generator=gen, dtype=F64)
    x = torch.randn(n, n, generator=gen, dtype=F64)
    s = x - x.T
    eye = torch.eye(n, dtype=F64)
    padded = torch.cat([a, torch.zeros(7, n - k, dtype=F64)], dim=-1)
    expected = padded @ (eye + 1.7 * s) @ torch.linalg.inv(eye - 1.7 * s)
    assert torch.allclose(cayley_apply_leading(a, s.clone(), 1.7), expected, atol=1e-12)
    assert torch.allclose(cayley_apply(padded, s.clone(), 1.7), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 64), (64, 48)])
def test_conflict_target_with_an_expert_that_keeps_no_row(shape):
    """Expert A conflicts with the mean on half of its rows, expert B on none: B is merged
    unrotated (``rho_B = tau_B``), A rotated towards its conflicting rows; both paths (reduced basis
    and row blocks) against the dense reference."""
    out, n = shape
    gen = torch.Generator().manual_seed(21)
    w0 = torch.randn(out, n, generator=gen, dtype=F64) / n**0.5
    tau = 0.3 * torch.randn(out, n, generator=gen, dtype=F64) / n**0.5
    half = torch.ones(out, 1, dtype=F64)
    half[: out // 2] = -2.0
    experts = [w0 + tau, w0 + half * tau]
    got, stats = decouple_merge(w0, experts, [0.5, 0.5], "conflict", "ta", {"lam": 0.9})
    assert stats.rows_kept == [out // 2, 0]
    assert torch.allclose(got, ref_merge(w0, experts, [0.5, 0.5], "conflict", lam=0.9), atol=1e-12, rtol=0)


def _lora_experts(out, n, ranks, seed, scale=0.3):
    """``W0`` and experts ``W0 + B_i A_i`` of the given ranks (a LoRA expert's rows add only
    ``rank(A_i)`` directions to ``W0``'s); rank ``None``: a dense fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, n, generator=gen, dtype=F64) / n**0.5
    experts = []
    for r in ranks:
        if r is None:
            delta = torch.randn(out, n, generator=gen, dtype=F64)
        else:
            delta = torch.randn(out, r, generator=gen, dtype=F64) @ torch.randn(r, n, generator=gen, dtype=F64)
        experts.append(w0 + scale * delta / float(delta.norm()) * float(w0.norm()))
    return w0, experts


@pytest.mark.parametrize("solver", ["svd", "eigh", "newton_schulz"])
def test_low_rank_targets_get_a_smaller_reduced_core(solver):
    """LoRA experts in the reduced basis (``2 out < in``): the core is ``out + rank`` (a certified
    randomized probe), a dense expert's ``2 out``; every rotation is the dense reference's."""
    w0, experts = _lora_experts(64, 200, [3, 5, None, 4], seed=21)
    rots = list(iter_procrustes(w0, experts, solver=solver))
    sizes = [rot.coeff.shape[1] for rot, _ in rots]
    assert sizes == [3, 5, 64, 64]  # after the dense expert, the fourth is not probed
    for (rot, _), wt in zip(rots, experts):
        assert torch.allclose(rot.dense(), ref_rotation(w0, wt), atol=1e-10)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("residual", ["ta", "ties"])
def test_low_rank_experts_merge_like_the_dense_reference(target, residual):
    w0, experts = _lora_experts(64, 200, [2, 6, 3], seed=22)
    weights = [0.5, 0.3, 0.2]
    got, _ = decouple_merge(w0, experts, weights, target, residual, solver="svd")
    if residual == "ta":
        want = ref_merge(w0, experts, weights, target)
    else:  # the same merge with the probe off: the QR basis of 2 out columns
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("peft_orthomerge.ops.decouple.solve.PROBE_COLUMNS", 0)
            want, _ = decouple_merge(w0, experts, weights, target, residual, solver="svd")
    assert torch.allclose(got, want, atol=1e-10 * float(want.abs().max()), rtol=0)


def test_a_target_inside_the_base_rows_is_not_probed_away():
    """A target whose rows lie in ``W0``'s (here ``R W0`` for a small ``out x out`` rotation ``R``:
    rank 0 outside) keeps the QR basis and still gets the reference rotation; probing goes on.
    (``R`` near the identity: a far one can make the optimum's det -1 on ``W0``'s rows, and the
    det fix then flips one of the complement's directions, all equally weak: a tie.)"""
    w0, experts = _lora_experts(64, 200, [3], seed=23)
    gen = torch.Generator().manual_seed(24)
    a = torch.randn(64, 64, generator=gen, dtype=F64)
    left = torch.linalg.matrix_exp(0.05 * (a - a.T))
    inside = left @ w0
    rots = list(iter_procrustes(w0, [inside, experts[0]], solver="svd"))
    assert [rot.coeff.shape[1] for rot, _ in rots] == [64, 3]
    for (rot, _), wt in zip(rots, [inside, experts[0]]):
        assert torch.allclose(rot.dense(), ref_rotation(w0, wt), atol=1e-10)
