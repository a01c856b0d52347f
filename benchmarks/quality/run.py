"""Small-scale replica of the paper's experiments: train, merge with every method, evaluate, report.

    python -m benchmarks.quality.run            # full run (a few minutes on 2 CPU cores; cached)
    python benchmarks/quality/run.py --smoke    # seconds-scale pipeline check (used by the tests)

Pipeline: a tiny Llama is pretrained from scratch on a mixture of Markov "language" text and the
synthetic tasks of `benchmarks.quality.data`; one OFT adapter and one LoRA adapter are trained per
task; the adapters are merged with every method through the user-facing harness
`peft_orthomerge.compare.compare_methods`; each merged model is scored on every task (exact match)
and on held-out language text (retention). The number of merged tasks is then grown from 2 to N
(the paper's Figure 5). Outputs: ``RESULTS.md``, ``results.json`` and ``quality.png`` in ``--out``.
Trained models are cached under ``benchmarks/quality/.cache/<config hash>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PEFT_ORTHOMERGE_QUIET", "1")

import torch

from peft_orthomerge.compare import available_methods, compare_methods

from . import report, train
from .evaluate import Evaluator

HERE = Path(__file__).resolve().parent
SCALING_OFT = ("orthomerge", "mean_q", "ta", "ties", "tsvm")
SCALING_LORA = ("ta", "ta+G", "ta+C", "ties", "ties+G", "ties+C")
SMOKE_OFT = ("orthomerge", "orthomerge/block", "mean_r", "ta")
SMOKE_LORA = ("ta", "ta+G", "ta+C")


def full_config() -> train.TrainConfig:
    return train.TrainConfig()


def smoke_config() -> train.TrainConfig:
    return replace(
        train.TrainConfig(),
        pretrain_steps=60,
        adapter_steps=15,
        tasks=train.data.TASKS[:3],
        batch=32,
        hidden=32,
        intermediate=64,
        heads=2,
        kv_heads=1,
        oft_block_size=8,
    )


def _magnitude_factors(adapters: list[str]) -> dict[str, float]:
    """OrthoMerge's per-module magnitude factor c over the OFT adapters (1 when all task rotations
    point the same way in so(b), sqrt(N) when they are mutually orthogonal with equal norms)."""
    import tempfile

    from peft_orthomerge import merge_oft_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        report = merge_oft_checkpoints(adapters, Path(tmp) / "merged", method="orthomerge")
    stats = report.summary_stats()
    return {k: stats[k] for k in ("c_mean", "c_min", "c_max") if k in stats} | {"sqrt_n": len(adapters) ** 0.5}


def run(smoke: bool = False, out: Path | None = None, cache: Path | None = None, verbose: bool = True) -> dict:
    """Run the experiment; returns the results dictionary (also written to ``out``)."""
    t_start = time.perf_counter()
    cfg = smoke_config() if smoke else full_config()
    out = Path(out) if out is not None else (HERE / ".cache" / "smoke-results" if smoke else HERE)
    out.mkdir(parents=True, exist_ok=True)
    arts = train.prepare(cfg, cache_root=Path(cache) if cache is not None else train.CACHE_ROOT, verbose=verbose)
    tasks = list(cfg.tasks)
    evaluator = Evaluator(tasks, cfg.seed, n=128 if smoke else 512)
    base = train.load_base(arts.base)
    oft_methods = list(SMOKE_OFT if smoke else available_methods("oft"))
    lora_methods = list(SMOKE_LORA if smoke else available_methods("lora"))
    common = {"average_over": tasks, "verbose": False}

    def compare(kind: str, k: int, methods, individual: bool) -> list[dict]:
        adapters = [str(getattr(arts, kind)[t]) for t in tasks[:k]]
        return compare_methods(
            base,
            adapters,
            evaluator,
            kind=kind,
            methods=methods,
            include_base=True,
            include_individual=individual,
            **common,
        )

    results: dict = {"config": asdict(cfg), "cache": str(arts.root), "train_log": arts.log, "tasks": tasks}
    results["oft"] = compare("oft", len(tasks), oft_methods, individual=True)
    if verbose:
        print(f"OFT merges done ({len(oft_methods)} methods)")
    results["lora"] = compare("lora", len(tasks), lora_methods, individual=True)
    if verbose:
        print(f"LoRA merges done ({len(lora_methods)} methods)")
    scaling: dict[str, list[dict]] = {"oft": [], "lora": []}
    ks = [2, len(tasks)] if smoke else list(range(2, len(tasks) + 1))
    for kind, methods in (
        ("oft", SMOKE_OFT[:1] if smoke else SCALING_OFT),
        ("lora", SMOKE_LORA[:2] if smoke else SCALING_LORA),
    ):
        methods = [m for m in methods if m in (oft_methods if kind == "oft" else lora_methods)]
        for k in ks:
            rows = results[kind] if k == len(tasks) else compare(kind, k, methods, individual=False)
            base_row = next(r for r in rows if r["method"] == "base")
            base_avg = sum(base_row[t] for t in tasks[:k]) / k
            for row in rows:
                if row["method"] in methods and not row.get("error"):
                    avg = sum(row[t] for t in tasks[:k]) / k
                    scaling[kind].append({"method": row["method"], "k": k, "avg": avg, "gain": avg - base_avg})
    results["scaling"] = scaling
    results["magnitude_factor"] = _magnitude_factors([str(arts.oft[t]) for t in tasks])
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report.write_plot(results, out / "quality.png")
    (out / "RESULTS.md").write_text(report.markdown(results, smoke=smoke))
    if verbose:
        print((out / "RESULTS.md").read_text())
        print(f"wrote {out / 'RESULTS.md'}, {out / 'quality.png'} in {results['seconds']:.1f}s")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny steps, 3 tasks, a subset of methods")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: benchmarks/quality/)")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory for trained models")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(smoke=args.smoke, out=args.out, cache=args.cache)


if __name__ == "__main__":
    main()
