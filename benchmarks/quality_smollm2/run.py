"""SmolLM2 replica driver: train (cached, resumable), merge and score (resumable), report.

    python -m benchmarks.quality_smollm2.run --plan            # the configuration and its cache paths
    python -m benchmarks.quality_smollm2.run --train --smoke   # 2 layers, 3 steps per adapter, 2 tasks
    python -m benchmarks.quality_smollm2.run --train           # the adapters (about an hour on 2 cores)
    python -m benchmarks.quality_smollm2.run --evaluate        # every merge, scored (results.json)
    python -m benchmarks.quality_smollm2.run --report          # RESULTS.md and the plots from results.json

``--evaluate --minutes M`` stops starting new rows after M minutes; rerun to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFT_ORTHOMERGE_QUIET", "1")

from benchmarks.real_model import smollm2_dir

from .train import TrainConfig, adapter_root, finished, prepare

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
SMOKE = dict(layers=2, tasks=("add", "upper"), train_examples=32, steps=3, batch=4, save_every=2)
NORM_LAYERS = (0, 7, 14, 22, 29)


def evaluate(cfg: TrainConfig, out: Path, minutes: float | None) -> None:
    """Score the rows that the finished adapters allow (a merge waits for all of its adapters)."""
    from .experiment import Experiment, decoupling_norms, magnitude_factors, planned_rows

    adapters = finished(cfg)
    complete = all(len(by_task) == len(cfg.tasks) for by_task in adapters.values())
    experiment = Experiment(smollm2_dir(cfg.layers), adapters, cfg.tasks, out)
    results = experiment.results
    results["config"] = asdict(cfg)
    if complete and "magnitude_factor" not in results:
        results["magnitude_factor"] = magnitude_factors([adapters["oft"][t] for t in cfg.tasks])
    if complete and "norms" not in results:
        layers = NORM_LAYERS if cfg.layers is None else tuple(range(cfg.layers))
        results["norms"] = decoupling_norms(smollm2_dir(cfg.layers), [adapters["lora"][t] for t in cfg.tasks], layers)
    results["train"] = {
        kind: {t: json.loads((p.parent / "done.json").read_text()) for t, p in by_task.items()}
        for kind, by_task in adapters.items()
    }
    results["planned_rows"] = planned_rows(cfg)
    experiment.run(deadline=None if minutes is None else time.time() + 60 * minutes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print the configuration and cache directories only")
    parser.add_argument("--train", action="store_true", help="train the adapters that are not cached yet")
    parser.add_argument("--evaluate", action="store_true", help="merge and score the rows not in results.json yet")
    parser.add_argument("--report", action="store_true", help="write RESULTS.md and the plots from results.json")
    parser.add_argument("--minutes", type=float, help="with --evaluate: start no new row after this many minutes")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (seconds); results go to /tmp")
    args = parser.parse_args(argv)
    cfg = replace(TrainConfig(), **SMOKE) if args.smoke else TrainConfig()
    out = Path("/tmp/quality_smollm2_smoke.json") if args.smoke else RESULTS
    print(json.dumps({"config": asdict(cfg), "cache": {k: str(adapter_root(cfg, k)) for k in cfg.kinds}}, indent=2))
    if args.train:
        prepare(cfg)
    if args.evaluate:
        evaluate(cfg, out, args.minutes)
    if args.report:
        from .report import write_report

        write_report(json.loads(out.read_text()), out.parent if not args.smoke else Path("/tmp"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
