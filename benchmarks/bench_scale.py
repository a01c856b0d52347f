"""Scale: peak memory of `merge_models` against the checkpoint size, and 1 vs 2 processes.

Synthetic Llama-shaped checkpoints (bf16, sharded safetensors, 4:1 GQA) are written to a
temporary directory; `merge_models` runs in a fresh child process (``python bench_scale.py
--child``; with 2 processes under ``python -m torch.distributed.run``) so that its peak memory
is its own. Each child reports:

- the peak resident set (``VmHWM``; `resource.getrusage`'s ``ru_maxrss`` where that is
  missing), which also counts the clean, file-backed pages of the memory-mapped safetensors
  inputs (the kernel drops them under memory pressure; they are why inputs larger than RAM
  still work);
- the peak anonymous memory (``RssAnon``, sampled every 5 ms): what the merge itself holds;

both minus the same process's memory after imports (torch alone is a few hundred MB).
The 2-process run must produce tensors identical to the 1-process run.

Rows (ratio = ours / baseline, except the speedup row): anonymous and total peak memory per
process vs the size of one checkpoint; wall time of 2 processes vs 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUICK = dict(hidden=128, intermediate=352, layers=2, heads=8, kv_heads=2, vocab=512, experts=2)
FULL = dict(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=16000, experts=3)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# -- synthetic checkpoints ---------------------------------------------------------------------
def llama_shapes(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, **_
) -> dict[str, tuple[int, ...]]:
    """Tensor names and torch-layout shapes of a Llama checkpoint (untied lm_head)."""
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_checkpoints(root: Path, cfg: dict) -> tuple[Path, list[Path], int]:
    """Base and ``cfg['experts']`` fine-tunes (base + 2% noise), bf16, ~4 shards each; one tensor in memory at a time."""
    from transformers import LlamaConfig

    from peft_orthomerge.sinks.output import ShardedSafetensorsWriter, finalize_shards

    shapes = llama_shapes(**cfg)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        tie_word_embeddings=False,
    )
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(cfg["experts"])]
    for k, directory in enumerate(dirs):
        directory.mkdir(parents=True)
        config.save_pretrained(directory)
        writer = ShardedSafetensorsWriter(directory, max_shard_bytes=max(total // 4, 1))
        for j, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(1000 * j)
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) / shape[-1] ** 0.5
            if k:
                g.manual_seed(1000 * j + k)
                w = w + 0.02 * w.abs().mean() * torch.randn(shape, generator=g)
            writer.add(name, w.to(torch.bfloat16))
        finalize_shards(directory, writer.close(), total_bytes=writer.total_bytes)
    return dirs[0], dirs[1:], total


# -- the measured child ------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _AnonPeak:
    """Samples this process's anonymous resident memory (``RssAnon``) in a background thread."""

    def __init__(self, period: float = 0.005) -> None:
        self.peak_kb = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)

    def _loop(self, period: float) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            time.sleep(period)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))


def child(args: argparse.Namespace) -> None:
    """Run one `merge_models` and write this rank's measurements as JSON."""
    torch.set_num_threads(args.threads)
    import peft_orthomerge.api.decouple  # noqa: F401 - everything imported before the baseline is taken
    from peft_orthomerge import merge_models
    from peft_orthomerge.device import resolve_device, synchronize
    from peft_orthomerge.sinks.parallel import leave_process_group

    base_total = _status_kb("VmRSS")
    base_anon = _status_kb("RssAnon")
    start = time.perf_counter()
    with _AnonPeak() as anon:
        merge_models(args.base, args.experts, args.out, device=args.device)
        synchronize(resolve_device(args.device))
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    # VmHWM: this address space's peak RSS. (getrusage's ru_maxrss would also carry the parent's
    # peak across fork + exec, so a child of a large process would report the parent's figure.)
    peak_total = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "rank": rank,
        "seconds": seconds,
        "import_rss_kb": base_total,
        "peak_rss_kb": peak_total,
        "peak_anon_kb": anon.peak_kb,
        "import_anon_kb": base_anon,
    }
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(result))
    leave_process_group(0)


def _measure(
    nproc: int, base: Path, experts: list[Path], out: Path, report: Path, device: str, threads: int
) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(threads)
    child_args = [
        str(Path(__file__).resolve()),
        "--child",
        "--base",
        str(base),
        "--out",
        str(out),
        "--report",
        str(report),
    ]
    child_args += ["--device", device, "--threads", str(threads), "--experts", *map(str, experts)]
    if nproc == 1:
        cmd = [sys.executable, *child_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *child_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merge_models with {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(nproc)]


def _same_tensors(a: Path, b: Path) -> bool:
    from peft_orthomerge.sources.tensors import TensorReader

    ra, rb = TensorReader.from_dir(a, "model"), TensorReader.from_dir(b, "model")
    return sorted(ra.keys()) == sorted(rb.keys()) and all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    cfg = QUICK if quick else FULL
    threads = 1
    # two ranks need two GPUs (one each); with fewer, the 1-vs-2-process rows run on the CPU
    device2 = device if device == "cpu" or torch.cuda.device_count() >= 2 else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        root = Path(tmp)
        base, experts, size = write_checkpoints(root, cfg)
        mb = size / 2**20
        one = _measure(1, base, experts, root / "out1", root / "m1", device, threads)[0]
        ref = one if device2 == device else _measure(1, base, experts, root / "ref1", root / "r1", device2, threads)[0]
        two = _measure(2, base, experts, root / "out2", root / "m2", device2, threads)
        identical = _same_tensors(root / ("out1" if device2 == device else "ref1"), root / "out2")
    if not identical:
        raise AssertionError("merge_models with 2 processes differs from 1 process")

    def above(rec: dict, peak: str, start: str) -> float:
        return max(rec[peak] - rec[start], 0) / 1024

    shape = f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['experts']} experts + base, bf16"
    anon1, total1 = above(one, "peak_anon_kb", "import_anon_kb"), above(one, "peak_rss_kb", "import_rss_kb")
    anon2 = max(above(r, "peak_anon_kb", "import_anon_kb") for r in two)
    t2 = max(r["seconds"] for r in two)
    return [
        {
            "name": "merge_models peak anon memory / 1 checkpoint",
            "unit": "MB",
            "baseline": mb,
            "ours": anon1,
            "ratio": anon1 / mb,
            "notes": f"1 process, above imports; {shape}; inputs {(cfg['experts'] + 1) * mb:.1f} MB",
        },
        {
            "name": "merge_models peak RSS (incl. mmap) / 1 checkpoint",
            "unit": "MB",
            "baseline": mb,
            "ours": total1,
            "ratio": total1 / mb,
            "notes": f"VmHWM above imports ({one['import_rss_kb'] / 1024:.0f} MB); counts reclaimable mmap pages",
        },
        {
            "name": "2 processes: max per-rank anon memory / 1 checkpoint",
            "unit": "MB",
            "baseline": mb,
            "ours": anon2,
            "ratio": anon2 / mb,
            "notes": f"torch.distributed.run on {device2} ({'gloo' if device2 == 'cpu' else 'nccl'})",
        },
        {
            "name": "merge_models wall time, 1 vs 2 processes",
            "unit": "s",
            "baseline": ref["seconds"],
            "ours": t2,
            "ratio": ref["seconds"] / t2,
            "notes": f"ratio = speedup; on {device2}, {threads} thread per process; outputs identical: {identical}",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--base")
    parser.add_argument("--experts", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--report")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        for row in run(quick=args.quick, device=args.device):
            print(row)


if __name__ == "__main__":
    main()
