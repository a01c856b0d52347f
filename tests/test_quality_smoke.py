"""The small-scale replica (`benchmarks/quality/`) end to end in ``--smoke`` mode, so it never rots.

Smoke mode trains for a few steps only: the numbers are meaningless and no accuracy is asserted;
the test checks that every stage runs and yields finite numbers, the table and the plot.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_produces_table_plot_and_finite_numbers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality" / "run.py"),
            "--smoke",
            "--threads",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tasks = results["tasks"]
    for kind in ("oft", "lora"):
        rows = results[kind]
        assert [r["method"] for r in rows if not r["method"].startswith("single:")][:1] == ["base"]
        assert len([r for r in rows if r["method"].startswith("single:")]) == len(tasks)
        for row in rows:
            assert row["error"] is None, (kind, row)
            for key in [*tasks, *(f"{t}:em" for t in tasks), "average", "lm_loss", "lm_acc"]:
                assert math.isfinite(row[key]), (kind, row["method"], key)
                if key != "lm_loss":
                    assert 0.0 <= row[key] <= 1.0
    assert {p["k"] for p in results["scaling"]["oft"]} == {2, len(tasks)}
    assert all(math.isfinite(p["gain"]) for pts in results["scaling"].values() for p in pts)
    text = (out / "RESULTS.md").read_text()
    assert "| method | " + " | ".join(tasks) + " | average |" in text
    assert "| orthomerge |" in text and "| ta+G |" in text
    png = (out / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Re-running with the same cache trains nothing again (only the merges are redone).
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality" / "run.py"),
            "--smoke",
            "--threads",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "pretrained base" not in proc.stdout and "trained oft" not in proc.stdout


def test_task_answers_match_their_definitions():
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality import data

    g = torch.Generator().manual_seed(0)
    for task in data.TASKS:
        batch = data.task_batch(task, 20, g, seed=3)
        ids = batch.input_ids
        assert ids.shape == (20, data.TOTAL_LEN)
        assert (ids[:, 0] == data.BOS).all() and (ids[:, 1] == data.TASK_TOKEN[task]).all()
        assert (ids[:, data.SEQ_LEN + 2] == data.SEP).all() and (ids[:, -1] == data.EOS).all()
        assert (batch.labels[:, : data.ANSWER_START] == -100).all()
        assert torch.equal(batch.labels[:, data.ANSWER_START :], ids[:, data.ANSWER_START :])
        for row in ids.tolist():
            x = [t - data.SYMBOL0 for t in row[2 : 2 + data.SEQ_LEN]]
            y = [t - data.SYMBOL0 for t in row[data.ANSWER_START : data.ANSWER_START + data.SEQ_LEN]]
            expected = {
                "copy": x,
                "reverse": x[::-1],
                "sort": sorted(x),
                "modadd": [(x[i] + (x[i - 1] if i else 0)) % data.N_SYMBOLS for i in range(len(x))],
            }.get(task)
            if task == "cipher":
                perm = data._cipher_perm(3).tolist()
                expected = [perm[v] for v in x]
            assert y == expected, task
    lm = data.lm_batch(8, g, seed=3)
    assert (lm.input_ids[:, 1] == data.LM_TOKEN).all() and (lm.input_ids[:, 2:] >= data.SYMBOL0).all()
