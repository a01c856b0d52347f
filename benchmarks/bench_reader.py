"""Reading every tensor of a bf16 safetensors file one at a time: `TensorReader.get` (positional
reads into fresh memory) against ``safetensors.safe_open(...).get_tensor`` (memory-mapped).

A synthetic bf16 file (full: ~200 MB, 50 tensors of 2048 x 1024; quick: ~16 MB) is written to a
temporary directory; each reader runs in a fresh child process (``python bench_reader.py --child
MODE FILE``, one torch thread) that reads the tensors one at a time, checks each for NaN/Inf
(`ensure_finite`, what ``TensorReader.get`` does by default, so both sides touch every byte) and
releases it. Each child reports, above its own footprint after imports:

- wall time of the reading loop (the file is in the page cache for both: it was just written);
- peak RSS growth: ``VmHWM`` (reset through ``/proc/self/clear_refs`` before the loop) minus
  ``VmRSS`` before it. With the memory map, every page touched stays resident (``RssFile``) while
  the file is open, so this grows to the file size; positional reads hold one tensor at a time;
- resident growth at the end of the loop (``RssFile + RssAnon``), before the file is closed.

Baseline and ours alternate (full: 3 runs each; the fastest time and the largest memory figure
of each are kept). Rows: ratio = ours / baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUICK = dict(tensors=8, rows=1024, cols=1024, repeats=1)  # 16 MiB
FULL = dict(tensors=50, rows=2048, cols=1024, repeats=3)  # 200 MiB


def _status_kb(*names: str) -> int:
    """Sum of the named fields of /proc/self/status, in KiB (0 where missing)."""
    total = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in names:
                total += int(value.split()[0])
    except OSError:
        pass
    return total


def child(mode: str, path: str) -> dict:
    """Read every tensor of ``path`` one at a time with ``mode`` ("baseline" or "ours")."""
    torch.set_num_threads(1)
    from safetensors import safe_open

    from peft_orthomerge.sources.tensors import TensorReader
    from peft_orthomerge.sources.validation import ensure_finite

    with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_kb("VmRSS")
    resident0 = _status_kb("RssFile", "RssAnon")
    start = time.perf_counter()
    if mode == "baseline":
        with safe_open(path, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = ensure_finite(handle.get_tensor(key), path=path, name=key)
                del tensor
            resident = _status_kb("RssFile", "RssAnon") - resident0
    else:
        reader = TensorReader.from_file(path)
        for key in reader.keys():
            tensor = reader.get(key)
            del tensor
        resident = _status_kb("RssFile", "RssAnon") - resident0
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_kb": _status_kb("VmHWM") - rss0, "resident_kb": resident}


def _measure(mode: str, path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reader child ({mode}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    from safetensors.torch import save_file

    cfg = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        path = Path(tmp) / "model.safetensors"
        g = torch.Generator().manual_seed(0)
        save_file(
            {
                f"t{i:03d}": torch.randn(cfg["rows"], cfg["cols"], generator=g).bfloat16()
                for i in range(cfg["tensors"])
            },
            str(path),
        )
        mb = path.stat().st_size / 2**20
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(cfg["repeats"]):
            for mode in runs:
                runs[mode].append(_measure(mode, path))
    best = {
        mode: {
            "seconds": min(r["seconds"] for r in rs),
            "peak_mb": max(r["peak_kb"] for r in rs) / 1024,
            "resident_mb": max(r["resident_kb"] for r in rs) / 1024,
        }
        for mode, rs in runs.items()
    }
    b, o = best["baseline"], best["ours"]
    where = f"{cfg['tensors']} bf16 tensors, {mb:.0f} MB file, one thread, fresh child each"

    def ratio(ours: float, baseline: float) -> float:
        return ours / baseline if baseline else float(ours == 0)

    return [
        {
            "name": "read every tensor: wall time",
            "unit": "s",
            "baseline": b["seconds"],
            "ours": o["seconds"],
            "ratio": ratio(o["seconds"], b["seconds"]),
            "notes": f"safe_open get_tensor (mmap) vs TensorReader.get (pread); {where}; best of {cfg['repeats']}",
        },
        {
            "name": "read every tensor: peak RSS growth",
            "unit": "MB",
            "baseline": b["peak_mb"],
            "ours": o["peak_mb"],
            "ratio": ratio(o["peak_mb"], b["peak_mb"]),
            "notes": f"VmHWM - VmRSS before the loop; file {mb:.0f} MB",
        },
        {
            "name": "read every tensor: resident growth at the end",
            "unit": "MB",
            "baseline": b["resident_mb"],
            "ours": o["resident_mb"],
            "ratio": ratio(o["resident_mb"], b["resident_mb"]),
            "notes": "RssFile + RssAnon, file still open",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
    else:
        for row in run(quick=args.quick):
            print(
                f"{row['name']:<48} baseline {row['baseline']:10.4f} ours {row['ours']:10.4f} ratio {row['ratio']:6.3f}  {row['notes']}"
            )


if __name__ == "__main__":
    main()
