"""``report``: statistics, drift from the base (spectral norm, hyperspherical energy), PNG plots."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from _cli_utils import build_oft_inputs
from click.testing import CliRunner

from peft_orthomerge import cli
from peft_orthomerge.diagnostics import (
    decoupled_stats,
    drift,
    hyperspherical_energy,
    layer_and_type,
    per_layer_stats,
    run_diagnostics,
)
from peft_orthomerge.errors import ConfigError, InputError
from peft_orthomerge.report import MergeReport, ModuleStats

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from peft_orthomerge import merge_oft_checkpoints

    root = tmp_path_factory.mktemp("diag")
    paths = build_oft_inputs(root, flags=[False, False, False])  # exact Cayley: orthogonal merge
    merge_oft_checkpoints([str(paths[f"oft{i}"]) for i in range(3)], root / "merged")
    return root / "merged", paths


def test_hyperspherical_energy_matches_definition():
    w = torch.randn(7, 5, dtype=torch.float64)
    unit = w / w.norm(dim=1, keepdim=True)
    expected = sum(1.0 / float((unit[i] - unit[j]).norm()) for i, j in itertools.permutations(range(7), 2))
    assert hyperspherical_energy(w) == pytest.approx(expected, rel=1e-12)


def test_drift_zero_for_input_rotation_and_nonzero_otherwise():
    torch.manual_seed(0)
    w0 = torch.randn(24, 16, dtype=torch.float64)
    r, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    d = drift(w0, w0 @ r.T)  # OFT acts on the input side
    assert abs(d["spectral_norm_rel_change"]) < 1e-12 and abs(d["he_rel_change"]) < 1e-12
    assert d["relative_frobenius_change"] > 0.1
    scaled = drift(w0, 3.0 * w0)
    assert scaled["spectral_norm_rel_change"] == pytest.approx(2.0) and abs(scaled["he_rel_change"]) < 1e-12
    moved = drift(w0, w0 + 0.5 * torch.randn(24, 16, dtype=torch.float64))
    assert abs(moved["he_rel_change"]) > 1e-4


def test_report_statistics_from_modules():
    assert layer_and_type("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert layer_and_type("lm_head.weight") == (None, "lm_head")
    mods = [
        ModuleStats(
            "model.layers.0.q",
            [3.0, 4.0],
            2.0,
            1.5,
            extra={
                "orth_part_norm_0": 1.0,
                "orth_part_norm_1": 3.0,
                "residual_norm_0": 2.0,
                "residual_norm_1": 4.0,
                "task_vector_norm_0": 3.0,
                "task_vector_norm_1": 5.0,
                "solver_error": 1e-9,
            },
        ),
        ModuleStats(
            "model.layers.0.v",
            [4.0, 3.0],
            2.0,
            1.2,
            extra={
                "orth_part_norm_0": 3.0,
                "orth_part_norm_1": 3.0,
                "residual_norm_0": 4.0,
                "residual_norm_1": 4.0,
                "task_vector_norm_0": 5.0,
                "task_vector_norm_1": 5.0,
            },
        ),
        ModuleStats(
            "model.layers.1.q",
            [1.0, 1.0],
            1.0,
            1.0,
            extra={
                "orth_part_norm_0": 5.0,
                "orth_part_norm_1": 5.0,
                "residual_norm_0": 6.0,
                "residual_norm_1": 6.0,
                "task_vector_norm_0": 7.0,
                "task_vector_norm_1": 7.0,
            },
        ),
    ]
    report = MergeReport("oft", "orthomerge", ["a", "b"], [0.5, 0.5], modules=mods)
    stats = per_layer_stats(report)
    assert stats["layers"] == [0, 1] and stats["axis"] == "layer"
    assert stats["magnitude_factor"] == {"q": {"0": 1.5, "1": 1.0}, "v": {"0": 1.2}}
    assert stats["input_norms"][0] == pytest.approx([5.0, 1.0]) and stats["input_norms"][1] == pytest.approx(
        [5.0, 1.0]
    )
    assert stats["merged_norm"] == pytest.approx([8**0.5, 1.0])
    dec = decoupled_stats(mods)
    assert dec["q"] == {"orthogonal part": 3.5, "residual": 4.5, "full task vector": 5.5}
    assert dec["v"] == {"orthogonal part": 3.0, "residual": 4.0, "full task vector": 5.0}


def test_report_command_on_oft_merge(merged):
    out, paths = merged
    result = CliRunner().invoke(cli.main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    diag = out / "diagnostics"
    data = json.loads((diag / "report.json").read_text())
    assert set(data["plots"]) == {
        "magnitude_factor.png",
        "norms_per_layer.png",
        "task_cosine.png",
        "drift_from_base.png",
    }
    for name in data["plots"]:
        assert (diag / name).read_bytes()[:8] == PNG and (diag / name).stat().st_size > 10_000
    # exact Cayley rotations leave the spectral norm and HE of every folded weight unchanged (fp32 rounding)
    assert len(data["drift"]) == 8
    for row in data["drift"]:
        assert abs(row["spectral_norm_rel_change"]) < 1e-5 and abs(row["he_rel_change"]) < 1e-5
        assert row["relative_frobenius_change"] > 1e-3
    cos = data["cosine"]
    assert all(cos[i][i] == pytest.approx(1.0) for i in range(3)) and cos[0][1] == pytest.approx(cos[1][0])
    assert data["per_layer"]["layers"] == [0, 1]
    # rerunning replaces the diagnostics directory
    again = CliRunner().invoke(cli.main, ["report", str(out), "--no-plots"])
    assert again.exit_code == 0 and sorted(p.name for p in diag.iterdir()) == ["report.json"]


def test_report_without_matplotlib(merged, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"peft-orthomerge\[plots\]"):
        run_diagnostics(merged[0], out=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_report_errors(tmp_path):
    with pytest.raises(InputError, match="not a finished"):
        run_diagnostics(tmp_path)
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_unlayered_modules_stay_out_of_per_layer_sums():
    mods = [ModuleStats("model.layers.0.q", [1.0], 1.0, 1.1), ModuleStats("lm_head.weight", [9.0], 9.0, 2.0)]
    stats = per_layer_stats(MergeReport("full", "m", ["a"], [1.0], modules=mods))
    assert stats["layers"] == [0] and stats["merged_norm"] == [1.0] and "lm_head" not in stats["magnitude_factor"]


def test_spectral_norm_power_iteration(monkeypatch):
    import peft_orthomerge.diagnostics as diag

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    s = torch.linspace(5.0, 0.1, 30, dtype=torch.float64)
    w = u[:, :30] @ torch.diag(s) @ v.T
    exact = diag.spectral_norm(w)
    assert exact == pytest.approx(5.0, rel=1e-12)
    monkeypatch.setattr(diag, "EXACT_SPECTRAL_MAX_DIM", 8)  # force the iteration
    assert diag.spectral_norm(w) == pytest.approx(5.0, rel=1e-5)
    r, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    assert abs(diag.drift(w, w @ r.T)["spectral_norm_rel_change"]) < 1e-6


def test_drift_plot_shows_orthogonality_error_and_one_layer_axes(tmp_path):
    """Neumann rotations are not exactly orthogonal: the drift plot shows the measured error, and a
    single layer gets a readable x range."""
    from peft_orthomerge.diagnostic_plots import PLOTS, require_matplotlib

    rows = [
        {"layer": 3, "type": t, "spectral_norm_rel_change": -1e-4, "he_rel_change": 1e-6, "orthogonality_error": e}
        for t, e in (("q", 1e-2), ("v", 2e-3))
    ]
    fig = PLOTS["drift_from_base.png"](require_matplotlib(), {"drift": rows})
    axes = fig.get_axes()
    assert len(axes) == 3 and axes[2].get_yscale() == "log"
    assert all(ax.get_xlim() == (2.0, 4.0) for ax in axes)
    title = fig.get_suptitle()
    assert "up to rounding" not in title and "1.0e-02" in title and "cayley='exact'" in title
