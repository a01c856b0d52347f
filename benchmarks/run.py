"""Run every benchmark of the project and print one table.

Usage::

    python benchmarks/run.py [--quick] [--device cpu|cuda|auto] [--only NAME ...] [--json FILE]

Every ``benchmarks/bench_*.py`` module present is imported and its ``run(quick: bool) -> list[dict]``
called (with ``device=...`` too when its ``run`` accepts it). Each row has the keys ``name``,
``baseline``, ``ours``, ``ratio`` and ``notes`` (optionally ``unit``); baseline and ours are
measured in the same run, so ratios compare like with like on whatever machine runs this.
``--quick`` uses small shapes: a few minutes on 2 CPU cores; CI runs it so the benchmarks never
rot. A module that raises is reported by name and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # the checkout's peft_orthomerge, installed or not
KNOWN = (
    "bench_oft",
    "bench_decouple",
    "bench_polar",
    "bench_real_weights",
    "bench_smollm2",
    "bench_scale",
    "bench_reader",
)
ROW_KEYS = ("name", "baseline", "ours", "ratio", "notes")


def discover(directory: Path = HERE) -> list[Path]:
    """The ``bench_*.py`` files in ``directory``, known ones first in a fixed order, then the rest."""
    found = {p.stem: p for p in sorted(directory.glob("bench_*.py"))}
    order = [n for n in KNOWN if n in found] + [n for n in found if n not in KNOWN]
    return [found[n] for n in order]


def load(path: Path):
    """Import one benchmark module from its file (its directory goes on ``sys.path`` for helpers)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def check_rows(module: str, rows: Any) -> list[dict]:
    """Validate a module's rows: a list of dicts with the required keys and finite numbers."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{module}.run() must return a non-empty list of dicts, got {type(rows).__name__}")
    for row in rows:
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
            raise ValueError(f"{module}: row {row!r} lacks one of {ROW_KEYS}")
        for key in ("baseline", "ours", "ratio"):
            value = row[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{module}: {row['name']}: {key} = {value!r} is not a finite number")
    return rows


def run_module(path: Path, *, quick: bool, device: str) -> list[dict]:
    module = load(path)
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{path.stem} has no run(quick) function")
    kwargs: dict[str, Any] = {"quick": quick}
    if "device" in inspect.signature(run).parameters:
        kwargs["device"] = device
    elif device != "cpu":
        print(f"note: {path.stem}.run() takes no device; it runs on its own default", file=sys.stderr)
    return check_rows(path.stem, run(**kwargs))


def run_all(
    *, quick: bool, device: str = "cpu", only: list[str] | None = None, directory: Path = HERE
) -> tuple[list[dict], dict[str, str]]:
    """Run the benchmarks; return ``(rows, failures)`` with ``failures[module] = error text``.

    Each row gets ``module`` and ``seconds`` (that module's wall time) added.
    """
    rows: list[dict] = []
    failures: dict[str, str] = {}
    for path in discover(directory):
        if only and path.stem not in only and path.stem.removeprefix("bench_") not in only:
            continue
        print(f"running {path.stem} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module_rows = run_module(path, quick=quick, device=device)
        except Exception as exc:
            failures[path.stem] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        seconds = time.perf_counter() - start
        rows += [{"module": path.stem, **row, "seconds": seconds} for row in module_rows]
    return rows, failures


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_table(rows: list[dict]) -> str:
    headers = ["module", "benchmark", "baseline", "ours", "ratio", "notes"]
    body = [
        [
            r["module"].removeprefix("bench_"),
            str(r["name"]) + (f" [{r['unit']}]" if r.get("unit") else ""),
            _fmt(r["baseline"]),
            _fmt(r["ours"]),
            f"{r['ratio']:.3g}x",
            str(r["notes"]),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # notes are not padded
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(headers, widths)), sep.join("-" * w for w in widths)]
    out += [
        sep.join(c.ljust(w) if i < 2 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in body
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CI); minutes on 2 CPU cores")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (modules that support it)")
    parser.add_argument("--only", nargs="*", help="module names to run (bench_scale or scale)")
    parser.add_argument("--json", type=Path, help="also write the rows (and failures) as JSON here")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device != "cpu":
        from peft_orthomerge.device import resolve_device

        args.device = str(resolve_device(args.device).type)  # ConfigError early when CUDA is missing
    present = {p.stem for p in discover(args.dir)}
    missing = [n for n in KNOWN if n not in present]
    rows, failures = run_all(quick=args.quick, device=args.device, only=args.only, directory=args.dir)
    print(
        f"\nbenchmarks ({'quick' if args.quick else 'full'}, device {args.device}); each ratio is defined in its notes"
    )
    print(format_table(rows))
    if missing:
        print(f"not present: {', '.join(missing)}")
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "failures": failures, "missing": missing}, indent=2, default=str)
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
