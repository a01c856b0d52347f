"""OFT benchmarks: adapter-space merge vs the I/O floor, and folding vs PEFT's ``merge_and_unload``.

(a) ``merge_oft_checkpoints`` of 5 synthetic OFT adapters shaped like Llama-3.1-8B (hidden 4096,
    intermediate 14336, q/k/v/o/gate/up/down, b = 32; 32 layers, ``--quick``: 2) against the I/O
    floor: what any merge must do without any math: open each input with ``safe_open``, bring every
    byte of every tensor into memory (``get_tensor`` maps the file lazily, so one ``sum`` per tensor
    touches it: the cheapest full read), and write one output of one input's size with
    ``save_file``. Floor and merge run alternately in fresh child processes (same page-cache state:
    inputs cached and written back before the first run; after each run its output is removed and
    every dirty page written back, outside the timing, so that no run competes with the writeback
    of an earlier one), timed after imports; each figure is the median of ``REPS`` runs
    (``--quick``: one). Also the merge
    with ``orthogonality_blocks=None`` (the report's orthogonality error measured on every block
    instead of the 4 largest per module). Memory of the merge child above its footprint after
    imports: peak anonymous memory (sampled ``RssAnon``: what the merge holds) and peak RSS
    (``ru_maxrss``, which also counts clean page-cache pages of the memory-mapped inputs).
(b) Folding one OFT adapter into a Llama-3.2-1B-shaped base (hidden 2048, intermediate 8192,
    32/8 heads, vocab 32000; 16 layers, ``--quick``: 1) against PEFT's ``merge_and_unload``
    (dense ``in x in`` block-diagonal matmuls), on the same inputs in the same process: compute
    only (both on a loaded float32 model; ours: build each rotation from the stored vector and fold
    it, assigning the new weight as PEFT does), and file to file (our streaming
    ``merge_oft_checkpoints(fold_into=...)`` vs PEFT load + ``merge_and_unload`` +
    ``save_pretrained``); medians of ``REPS`` runs (PEFT's compute-heavy runs: ``PEFT_REPS``); plus
    the max relative difference of the weights.

Everything runs on one thread (on a shared machine, idle-waiting OpenMP threads distort timings
by orders of magnitude). Every ratio is ours / baseline. Goals: merge <= 2x the floor (issue 15);
peak anon memory < 2 input adapters; fold time <= 0.1x PEFT's; weights equal to 1e-5 relative.

Run: ``python benchmarks/bench_oft.py [--quick] [--merge-only] [--reps N]`` (``--merge-only``: part
(a) alone, which takes seconds where (b) takes minutes; ``--reps``: runs per measurement). The merge
rows also give the median of the per-run ratios (each merge over the floor run just before it).
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's peft_orthomerge, installed or not
MODULES_8B = {
    "q_proj": 4096,
    "k_proj": 4096,
    "v_proj": 4096,
    "o_proj": 4096,
    "gate_proj": 4096,
    "up_proj": 4096,
    "down_proj": 14336,
}
SHAPE_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000
)
REPS = 5  # runs per measurement; the median is reported
PEFT_REPS = 2  # PEFT's dense merge of the full 1B shape takes minutes per run on one thread


def _module_path(layer: int, proj: str) -> str:
    group = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{proj}"


def write_synthetic_adapter(
    path: Path, in_features: dict[str, int], layers: int, *, b: int = 32, seed: int = 0
) -> int:
    """A PEFT-format OFT adapter (Neumann flag) with random blocks of std 0.01; returns its file size."""
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    n = b * (b - 1) // 2
    tensors = {
        f"base_model.model.{_module_path(layer, proj)}.oft_R.weight": torch.randn(dim // b, n, generator=g) * 0.01
        for layer in range(layers)
        for proj, dim in in_features.items()
    }
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "peft_type": "OFT", "r": 0, "oft_block_size": b, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5,
        "target_modules": sorted(in_features), "coft": False, "eps": 6e-5, "block_share": False, "bias": "none",
        "module_dropout": 0.0, "init_weights": True, "peft_version": "0.21.2", "task_type": "CAUSAL_LM",
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    return (path / "adapter_model.safetensors").stat().st_size


# -- child processes ---------------------------------------------------------------------------
def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class _AnonSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_anon_kb()
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _rss_anon_kb())
            time.sleep(0.005)


def _child(task: str, args: dict) -> dict:
    import resource

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imports are not what we measure)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from peft_orthomerge import merge_oft_checkpoints

    anon0, rss0 = _rss_anon_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = _AnonSampler()
    sampler.start()
    start = time.perf_counter()
    if task == "floor":
        kept = {}
        for i, d in enumerate(args["inputs"]):
            with safe_open(str(Path(d) / "adapter_model.safetensors"), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for t in tensors.values():
                t.sum()  # get_tensor maps the file lazily: touch every byte once
            if i == 0:
                kept = tensors
        Path(args["output"]).mkdir(parents=True)
        save_file(kept, str(Path(args["output"]) / "adapter_model.safetensors"))
    else:
        merge_oft_checkpoints(args["inputs"], args["output"], **args.get("kwargs", {}))
    seconds = time.perf_counter() - start
    sampler.stop = True
    sampler.join()
    sampler.peak = max(sampler.peak, _rss_anon_kb())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "anon_mb": (sampler.peak - anon0) / 1024, "rss_mb": (rss - rss0) / 1024}


def _run_child(task: str, args: dict) -> dict:
    """One timed child; afterwards (outside its timing) its output is removed and every dirty page
    written back, so that no later run competes with this one's writeback for the disk."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PEFT_ORTHOMERGE_QUIET": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {task} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(args["output"], ignore_errors=True)
    os.sync()
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- (a) adapter-space merge -------------------------------------------------------------------
def bench_merge(tmp: Path, quick: bool, reps: int | None = None) -> list[dict]:
    layers = 2 if quick else 32
    reps = reps or (1 if quick else REPS)
    inputs = [tmp / f"adapter{i}" for i in range(5)]
    sizes = [write_synthetic_adapter(d, MODULES_8B, layers, seed=i) for i, d in enumerate(inputs)]
    os.sync()  # the inputs on disk (and in the page cache) before any timed run
    size = sizes[0]
    args = {"inputs": [str(d) for d in inputs]}
    floors, ours, exhaustive = [], [], []
    for rep in range(reps):  # alternate (same page-cache state for all), report medians
        floors.append(_run_child("floor", {**args, "output": str(tmp / f"floor{rep}")}))
        ours.append(_run_child("merge", {**args, "output": str(tmp / f"merged{rep}")}))
        exhaustive.append(
            _run_child(
                "merge", {**args, "output": str(tmp / f"exhaustive{rep}"), "kwargs": {"orthogonality_blocks": None}}
            )
        )
    floor = statistics.median(r["seconds"] for r in floors)
    mid = statistics.median(r["seconds"] for r in ours)
    every = statistics.median(r["seconds"] for r in exhaustive)
    anon = max(r["anon_mb"] for r in ours)
    rss = max(r["rss_mb"] for r in ours)
    mb = size / 2**20
    label = f"5 OFT adapters, Llama-3.1-8B shapes, {layers} layers, b=32"
    floor_note = f"median of {reps}; floor = read every input byte + write one adapter"
    paired = statistics.median(m["seconds"] / f["seconds"] for m, f in zip(ours, floors))
    paired_every = statistics.median(m["seconds"] / f["seconds"] for m, f in zip(exhaustive, floors))
    return [
        {"name": f"merge time vs I/O floor ({label})", "baseline": floor, "ours": mid,
         "ratio": mid / floor, "unit": "s", "notes": f"ours/floor; goal <= 2; per-run ratios' median {paired:.3g}; {floor_note}"},
        {"name": f"merge time, orthogonality error on every block, vs I/O floor ({label})", "baseline": floor, "ours": every,
         "ratio": every / floor, "unit": "s", "notes": f"ours/floor, orthogonality_blocks=None (opt-in); per-run {paired_every:.3g}; {floor_note}"},
        {"name": f"merge peak anon memory vs one input adapter ({mb:.0f} MB)", "baseline": mb, "ours": anon,
         "ratio": anon / mb, "unit": "MB", "notes": f"goal < 2; peak RSS incl. mmapped inputs {rss:.0f} MB"},
    ]  # fmt: skip


# -- (b) folding vs PEFT -----------------------------------------------------------------------
def _write_base(path: Path, layers: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **SHAPE_1B)
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    h, inter, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
    )
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _fold_in_memory(model, adapter_dir: Path) -> float:
    """Our block fold applied to an in-memory model's weights (compute only); returns seconds."""
    from peft_orthomerge.ops.oft_fold import fold_weight
    from peft_orthomerge.ops.skew import peft_rotation, vec_to_skew
    from peft_orthomerge.sources.oft import read_adapter_dir

    adapter = read_adapter_dir(str(adapter_dir), adapter_dir)
    modules = dict(model.named_modules())
    start = time.perf_counter()
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            rotation = peft_rotation(
                vec_to_skew(adapter.canonical(name), mod.b), adapter.use_cayley_neumann, adapter.terms
            )
            layer = modules[name]
            layer.weight.data = fold_weight(layer.weight.data, rotation, mod.kind)  # as PEFT's merge assigns it
    return time.perf_counter() - start


def bench_fold(tmp: Path, quick: bool) -> list[dict]:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from peft_orthomerge import merge_oft_checkpoints

    layers = 1 if quick else 16
    reps, peft_reps = (1, 1) if quick else (REPS, PEFT_REPS)
    h, inter = SHAPE_1B["hidden_size"], SHAPE_1B["intermediate_size"]
    dims = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h, "down_proj": inter}
    _write_base(tmp / "base", layers)
    write_synthetic_adapter(tmp / "adapter", dims, layers, seed=7)

    ours_files, ours_compute, peft_files, peft_compute = [], [], [], []
    for rep in range(reps):
        start = time.perf_counter()
        merge_oft_checkpoints([tmp / "adapter"], tmp / f"folded{rep}", fold_into=tmp / "base")
        ours_files.append(time.perf_counter() - start)
        ours_compute.append(
            _fold_in_memory(AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32), tmp / "adapter")
        )
    for rep in range(peft_reps):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, tmp / "adapter")
        loaded = time.perf_counter()
        merged = peft_model.merge_and_unload()
        peft_compute.append(time.perf_counter() - loaded)
        merged.save_pretrained(tmp / f"peft-folded{rep}")
        peft_files.append(time.perf_counter() - start)
    ours_files, ours_compute = statistics.median(ours_files), statistics.median(ours_compute)
    peft_files, peft_compute = statistics.median(peft_files), statistics.median(peft_compute)

    reference = merged.state_dict()
    worst = 0.0
    with safe_open(str(tmp / "folded0" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            a, b = f.get_tensor(key), reference[key]
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    label = f"1 OFT adapter into Llama-3.2-1B shapes, {layers} layer(s), b=32"
    runs = f"medians: ours of {reps}, PEFT of {peft_reps}"
    return [
        {"name": f"fold compute vs PEFT merge_and_unload ({label})", "baseline": peft_compute, "ours": ours_compute,
         "ratio": ours_compute / peft_compute, "unit": "s", "notes": f"in memory, float32, ours/PEFT; goal <= 0.1; {runs}"},
        {"name": f"fold file to file vs PEFT load+merge_and_unload+save ({label})", "baseline": peft_files,
         "ours": ours_files, "ratio": ours_files / peft_files, "unit": "s", "notes": f"ours/PEFT, incl. reading and writing; {runs}"},
        {"name": "fold: max relative weight difference vs PEFT", "baseline": 1e-5, "ours": worst, "ratio": worst / 1e-5,
         "notes": "max |ours - PEFT| / max |PEFT| per tensor, vs 1e-5; goal ratio <= 1"},
    ]  # fmt: skip


def run(quick: bool = True, *, merge_only: bool = False, reps: int | None = None) -> list[dict]:
    """Every row of (a) and (b) (``merge_only``: (a) alone); ``reps``: runs per measurement."""
    from peft_orthomerge.progress import quiet

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-oft-") as tmp, quiet():
        tmp = Path(tmp)
        rows = bench_merge(tmp / "merge", quick, reps)
        return rows if merge_only else rows + bench_fold(tmp / "fold", quick)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]))))
        sys.exit(0)
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else None
    for row in run(quick="--quick" in sys.argv, merge_only="--merge-only" in sys.argv, reps=reps):
        print(
            f"{row['name']}: baseline {row['baseline']:.4g} {row.get('unit', '')}, ours {row['ours']:.4g} "
            f"{row.get('unit', '')}, ratio {row['ratio']:.3g} ({row['notes']})"
        )
