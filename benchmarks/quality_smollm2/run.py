"""SmolLM2 replica driver: train (cached, resumable), then a later session merges and scores.

    python -m benchmarks.quality_smollm2.run --plan            # the configuration and its cache path
    python -m benchmarks.quality_smollm2.run --train --smoke   # 2 layers, 3 steps per adapter, 2 tasks
    python -m benchmarks.quality_smollm2.run --train           # the real run (hours on a CPU)

The merge / evaluation stage (every method through `peft_orthomerge.compare.compare_methods`,
scored by `evaluate`) is not written yet: see the module list in ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFT_ORTHOMERGE_QUIET", "1")

from .train import TrainConfig, prepare, run_dir

SMOKE = dict(layers=2, tasks=("add", "upper"), train_examples=32, steps=3, batch=4, save_every=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print the configuration and cache directory only")
    parser.add_argument("--train", action="store_true", help="train the adapters that are not cached yet")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
    parser.add_argument("--steps", type=int, help="override the number of steps per adapter")
    args = parser.parse_args(argv)
    cfg = replace(TrainConfig(), **SMOKE) if args.smoke else TrainConfig()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    print(json.dumps({"config": asdict(cfg), "cache": str(run_dir(cfg))}, indent=2))
    if args.train:
        adapters = prepare(cfg)
        print(json.dumps({k: {t: str(p) for t, p in v.items()} for k, v in adapters.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
