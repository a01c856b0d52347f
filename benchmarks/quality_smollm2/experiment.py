"""Merge the trained SmolLM2 adapters with every method and score each model; resumable.

Every scored model is one row of ``results.json`` (written after each row, atomically), keyed by
``(kind, method, tasks merged)``; a rerun computes only the rows that are missing, so the stage can
be interrupted and resumed. Rows are computed in order of importance (base, single adapters, the
OrthoMerge variants, the Euclidean baselines, then the 2..N-task scaling runs).

Each merge goes through `peft_orthomerge.compare.compare_methods` (one method per call, on a deep
copy of the base); a `PeftModel` is folded with PEFT's own ``merge_and_unload`` before scoring,
which gives the same outputs as the unfolded adapter up to float32 rounding and scores at the
base's speed.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from peft_orthomerge.compare import available_methods, compare_methods

from .evaluate import Evaluator

# The scaling runs (paper Figure 5): these methods, for k = 2 .. N-1 on two subsets of k tasks
# (the first k and the last k of the task order; N tasks is the main table). All subsets of every
# size would be 10 merges per method for 4 tasks: more than one session's CPU time.
SCALING = {"oft": ("orthomerge", "ta"), "lora": ("ta", "ta+C")}


def row_key(kind: str, method: str, merged: tuple[str, ...]) -> str:
    return f"{kind}|{method}|{'+'.join(merged)}"


def _folded(model):
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _plan(adapters: dict[str, dict[str, Path]], tasks: tuple[str, ...]) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """``(kind, method, merged tasks)`` of every row, most important first."""
    yield "base", "base", ()
    for kind in adapters:
        for task in tasks:
            yield kind, "single", (task,)
    merges = [(kind, method) for kind in adapters for method in available_methods(kind)]
    merges.sort(key=lambda km: FIRST.index(km) if km in FIRST else len(FIRST))
    late = [km for km in merges if km[0] == "lora" and km[1].startswith("mergekit_")]  # after Figure 5
    for kind, method in merges:
        if (kind, method) not in late:
            yield kind, method, tasks
    for size in range(2, len(tasks)):
        for subset in dict.fromkeys((tasks[:size], tasks[-size:])):
            for kind in adapters:
                for method in SCALING[kind]:
                    yield kind, method, subset
    for kind, method in late:
        yield kind, method, tasks


# The N-task merges scored first (the paper's headline comparisons), so that an interrupted run
# has both kinds; the other methods follow in registry order.
FIRST = [
    ("oft", "orthomerge"),
    ("lora", "ta"),
    ("lora", "ta+C"),
    ("oft", "ta"),
    ("lora", "ties"),
    ("lora", "ties+C"),
    ("oft", "mean_q"),
    ("lora", "ta+G"),
    ("oft", "ties"),
    ("lora", "tsvm"),
    ("lora", "tsvm+C"),
    ("oft", "orthomerge/block"),
    # then every residual of the library plain, +G and +C (the paper's Table 2 rows), before the
    # mergekit definitions
    ("lora", "ties+G"),
    ("lora", "tsvm+G"),
    ("lora", "dare_ties"),
    ("lora", "dare_ties+C"),
    ("lora", "dare_ta"),
    ("lora", "dare_ta+C"),
    ("lora", "fisher_rao"),
    ("lora", "fisher_rao+C"),
    ("lora", "dare_ties+G"),
    ("lora", "dare_ta+G"),
    ("lora", "fisher_rao+G"),
]


def planned_rows(cfg) -> int:
    """How many rows a complete run of ``cfg`` scores."""
    return sum(1 for _ in _plan({kind: {} for kind in cfg.kinds}, tuple(cfg.tasks)))


class Experiment:
    """The base model, the adapters, the evaluator and the results file of one replica run."""

    def __init__(self, base_dir: Path, adapters: dict[str, dict[str, Path]], tasks: tuple[str, ...], out: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.evaluator = Evaluator(AutoTokenizer.from_pretrained(base_dir))
        self.adapters, self.tasks, self.out = adapters, tasks, out
        self.results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}

    def _save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out)

    def _score(self, task_names: tuple[str, ...]) -> Callable[[object], dict[str, float]]:
        return lambda model: self.evaluator.scores(_folded(model), task_names)

    def _row(self, kind: str, method: str, merged: tuple[str, ...]) -> dict:
        scored = self.tasks if len(merged) in (0, 1, len(self.tasks)) else merged
        if kind == "base":
            t0 = time.perf_counter()
            return {"seconds": 0.0, **self._score(self.tasks)(self.base), "eval_seconds": time.perf_counter() - t0}
        paths = [str(self.adapters[kind][t]) for t in merged]
        t0 = time.perf_counter()
        rows = compare_methods(
            self.base,
            paths,
            self._score(scored),
            kind=kind,
            methods=[] if method == "single" else [method],
            include_base=False,
            include_individual=method == "single",
            verbose=False,
        )
        (row,) = rows
        row.pop("method")
        row.pop("average", None)
        return {**row, "eval_seconds": time.perf_counter() - t0 - row["seconds"]}

    def run(self, say=print, deadline: float | None = None) -> None:
        """Compute the missing rows (stopping before ``deadline``, a `time.time` value, if given)."""
        for kind, method, merged in _plan(self.adapters, self.tasks):
            key = row_key(kind, method, merged)
            if key in self.results["rows"] or not all(t in self.adapters.get(kind, {}) for t in merged):
                continue
            if deadline is not None and time.time() > deadline:
                say("deadline reached; rerun to continue")
                return
            row = self._row(kind, method, merged)
            self.results["rows"][key] = row
            self._save()
            shown = {k: round(v, 3) for k, v in row.items() if isinstance(v, float) and "@" not in k}
            say(f"{key}: {shown}")


def magnitude_factors(oft_adapters: list[Path]) -> dict[str, float]:
    """OrthoMerge's per-module magnitude factor c over the OFT adapters (1: every task rotation
    points the same way in so(b); sqrt(N): mutually orthogonal with equal norms)."""
    import tempfile

    from peft_orthomerge import merge_oft_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        report = merge_oft_checkpoints([str(p) for p in oft_adapters], Path(tmp) / "merged", method="orthomerge")
    stats = report.summary_stats()
    return {k: stats[k] for k in ("c_mean", "c_min", "c_max") if k in stats} | {"sqrt_n": len(oft_adapters) ** 0.5}


def decoupling_norms(base_dir: Path, lora_adapters: list[Path], layers: tuple[int, ...]) -> dict[str, dict]:
    """Paper Figure 4 on the real weights: per module type, the mean over ``layers`` and tasks of
    ``||W0 P_i - W0||_F`` (orthogonal part), ``||W_i - W0 P_i||_F`` (residual) and ``||W_i - W0||_F``
    (task vector), with ``W_i = W0 + (alpha / r) B_i A_i`` and ``P_i`` the closest-to-identity
    Procrustes rotation of the decoupling (``W_i ~ W0 @ P_i``, layout ``(out, in)``), in float64."""
    from safetensors import safe_open

    from peft_orthomerge.ops.decouple.solve import procrustes_rotation

    sums: dict[str, dict[str, float]] = {}
    with safe_open(base_dir / "model.safetensors", "pt") as base:
        for adapter in lora_adapters:
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            scale = cfg["lora_alpha"] / cfg["r"]
            with safe_open(adapter / "adapter_model.safetensors", "pt") as lora:
                for layer, module in itertools.product(layers, ("q", "k", "v", "o", "gate", "up", "down")):
                    part = "mlp" if module in ("gate", "up", "down") else "self_attn"
                    name = f"model.layers.{layer}.{part}.{module}_proj"
                    w0 = base.get_tensor(f"{name}.weight").double()
                    a = lora.get_tensor(f"base_model.model.{name}.lora_A.weight").double()
                    b = lora.get_tensor(f"base_model.model.{name}.lora_B.weight").double()
                    delta = scale * b @ a
                    rotated = w0 @ procrustes_rotation(w0, w0 + delta)
                    acc = sums.setdefault(module, {"orthogonal": 0.0, "residual": 0.0, "task_vector": 0.0, "n": 0})
                    acc["orthogonal"] += float((rotated - w0).norm())
                    acc["residual"] += float((w0 + delta - rotated).norm())
                    acc["task_vector"] += float(delta.norm())
                    acc["n"] += 1
    return {m: {k: v / acc["n"] for k, v in acc.items() if k != "n"} for m, acc in sums.items()}
