"""Decoupled merging (orthogonal rotation + residual) vs a straightforward dense implementation.

Synthetic experts shaped like a small Llama (full: hidden 1024, intermediate 2816, 4:1 GQA, 5
experts; quick: hidden 256, intermediate 704). Weights ``W0 = U diag(s) V^T`` with a realistic
spectrum (``s`` log-spaced over 1.5 decades), experts ``W0 + tau_i`` with dense ``tau_i`` (a full
fine-tune, the hard case: no low-rank shortcut applies).

Rows:

- *decouple one layer in memory*: seconds for all 7 projections of one decoder layer (identical
  work per layer, so the ratio holds for any depth), with ``target="global"``, TA residuals.
  Baseline (`baseline_merge`): the paper's Algorithm 2 written plainly in fp32, as issue 15
  defines it: per task the SVD polar factor ``U V^T`` of ``W0^T W_i`` (no rank rule: on a
  rank-deficient ``M`` its null-space rotation is arbitrary), inverse Cayley and Cayley by linear
  solves, magnitude-corrected mean, TA. Ours: `decouple_merge` with its defaults (``solver="auto"``:
  the certified ``eigh`` polar factors in float64 on the CPU; reduced basis for ``2 out <= in``
  with the skew sums kept in the base's frame, factored cores, LU solves), with ``solver="svd"``
  (the default before the eigh route), and with ``dtype=float32``. Projections whose baseline
  runs under 8 s are timed 3 times, interleaved, and the medians summed. ``ratio`` = baseline /
  ours; notes give each variant's largest relative error ``||x - exact||_F / ||exact||_F`` against
  the float64 SVD answer, and the per-projection ratios.
- *merge_models file to file*: a one-layer Llama checkpoint (hidden 1024, intermediate 2816, 4:1
  GQA, vocabulary 512, float32; quick: hidden 256, vocabulary 128) and 5 dense fine-tunes of it;
  every 2-D weight (the embeddings too) is decoupled. ``merge_models`` (read, merge, write,
  report) in float64 and in float32 against the baseline on the same tensors already in memory,
  alternating, medians of 2; the error of each written weight against ``solver="svd"`` in float64;
  and per weight (the embeddings too) the ratio of the baseline's median to one in-memory
  `decouple_merge` in that precision.
- *merge_models peak RSS*: a fresh child process merges bf16 checkpoints (quick: 2 layers, vocab
  4000, 2 experts; full: 8 layers, vocab 32000, 5 experts) with `merge_models` (defaults, and
  ``residual="ties"`` in the full run); ``baseline`` = one checkpoint's size (MB), ``ours`` = the
  process's peak RSS (``VmHWM``, file pages included) above its RSS after imports (MB),
  ``ratio`` = ours / baseline (goal < 1.5). Notes add the peak anonymous memory and the time.

Run: ``python benchmarks/bench_decouple.py [--quick] [--memory-only | --time-only] [--residuals=ta,ties,...]
[--targets=global,conflict,none]`` (one thread); ``--memory-only`` skips the timing rows, ``--time-only``
the memory rows, ``--residuals``
and ``--targets`` choose the methods and decoupling targets measured (``none``: no decoupling).
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
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peft_orthomerge.ops.decouple import decouple_merge

F32 = torch.float32


def _shapes(hidden: int, inter: int, kv_ratio: int = 4) -> dict[str, tuple[int, int]]:
    kv = hidden // kv_ratio
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def _weight(out: int, n: int, gen: torch.Generator) -> torch.Tensor:
    r = min(out, n)
    u = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    s = torch.logspace(0, -1.5, r)
    return (u * s) @ v.T


def _experts(w0: torch.Tensor, count: int, gen: torch.Generator, scale: float = 0.05) -> list[torch.Tensor]:
    rms = w0.pow(2).mean().sqrt()
    return [w0 + scale * rms * torch.randn(w0.shape, generator=gen) for _ in range(count)]


# -- the straightforward implementation of the same mathematics (fp32, dense) --------------------
def _right_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^-1`` by one linear solve (``b^T x^T = a^T``), no inverse."""
    return torch.linalg.solve(b.T, a.T).T


def baseline_merge(w0: torch.Tensor, experts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Paper Algorithm 2 written plainly in fp32: per task the SVD polar factor ``P_i = U V^T`` of
    ``W0^T W_i`` (det fixed on the weakest direction), ``Q_i = (P_i - I)(P_i + I)^-1`` by a solve,
    the magnitude-corrected mean, ``P = (I + Q)(I - Q)^-1`` by a solve, and TA residuals."""
    w0 = w0.to(F32)
    n = w0.shape[1]
    eye = torch.eye(n, dtype=F32)
    qs, rhos = [], []
    for w in experts:
        w = w.to(F32)
        u, _, vh = torch.linalg.svd(w0.T @ w)
        if torch.linalg.det(u @ vh) < 0:
            u[:, -1] *= -1
        p = u @ vh
        q = _right_solve(p - eye, p + eye)
        qs.append(0.5 * (q - q.T))
        rhos.append(w - w0 @ p)
    s_sum = sum(wt * q for wt, q in zip(weights, qs))
    total = sum(wt * float(q.norm()) for wt, q in zip(weights, qs))
    q = s_sum * (total / float(s_sum.norm()))
    p = _right_solve(eye + q, eye - q)
    return w0 @ p + sum(wt * r for wt, r in zip(weights, rhos))


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _warm_up(gen: torch.Generator) -> None:
    """First LAPACK calls per dtype pay one-time setup; keep it out of the timings."""
    warm = _weight(48, 96, gen)
    baseline_merge(warm, _experts(warm, 2, gen), [0.5, 0.5])
    for dtype in (torch.float64, F32):
        for solver in ("svd", "eigh"):
            decouple_merge(warm, _experts(warm, 2, gen), [0.5, 0.5], "global", solver=solver, dtype=dtype)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def bench_layer(quick: bool, repeats: int = 3, cheap_s: float = 8.0) -> list[dict]:
    """Per projection: baseline and ours run interleaved, ``repeats`` times when the baseline took
    under ``cheap_s`` seconds (else once); the row sums the per-projection medians. Accuracy: the
    largest relative Frobenius distance to the float64 SVD answer (`decouple_merge`, ``solver="svd"``)."""
    hidden, inter = (256, 704) if quick else (1024, 2816)
    count = 5
    weights = [1.0 / count] * count
    gen = torch.Generator().manual_seed(0)
    _warm_up(gen)
    runs = {
        "default": lambda w0, ws: decouple_merge(w0, ws, weights, "global", "ta")[0],  # auto: eigh, float64
        "fp32": lambda w0, ws: decouple_merge(w0, ws, weights, "global", "ta", dtype=F32)[0],  # auto: svd
        "svd": lambda w0, ws: decouple_merge(w0, ws, weights, "global", "ta", solver="svd")[0],  # float64
    }
    total = {"baseline": 0.0, **dict.fromkeys(runs, 0.0)}
    worst = {"baseline": 0.0, **dict.fromkeys(runs, 0.0)}
    per_module = {k: [] for k in runs}
    for name, (out, n) in _shapes(hidden, inter).items():
        w0 = _weight(out, n, gen)
        ws = _experts(w0, count, gen)
        exact = decouple_merge(w0.double(), [w.double() for w in ws], weights, "global", "ta", solver="svd")[0]
        times: dict[str, list[float]] = {k: [] for k in total}
        for _rep in range(repeats):
            for key, fn in {"baseline": lambda a, b: baseline_merge(a, b, weights), **runs}.items():
                t, got = _timed(fn, w0, ws)
                times[key].append(t)
                worst[key] = max(worst[key], _rel(got, exact))
                del got
            if times["baseline"][0] >= cheap_s:
                break
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in total:
            total[k] += med[k]
        for k in runs:
            per_module[k].append(f"{name.split('.')[-1]} {med['baseline'] / med[k]:.1f}x")
    shape = f"hidden {hidden}, inter {inter}, GQA 4:1, {count} experts"
    labels = {
        "default": (
            "default fp64",
            f"baseline: plain fp32 Algorithm 2 (max rel. error {worst['baseline']:.1e}); ours",
        ),
        "svd": ("float64 with solver='svd'", "the default before the eigh route; max rel. error"),
        "fp32": ("precision float32", "max rel. error"),
    }
    return [
        dict(
            name=f"decouple one layer in memory, {label} ({shape})",
            baseline=total["baseline"],
            ours=total[key],
            ratio=total["baseline"] / total[key],
            unit="s",
            notes=f"{lead} {worst[key]:.1e} from the float64 SVD answer; per projection: {', '.join(per_module[key])}",
        )
        for key, (label, lead) in labels.items()
    ]


def _llama_config(hidden: int, inter: int, layers: int, vocab: int, dtype: str) -> dict:
    """``config.json`` of the benchmark's Llama checkpoints: heads of 64, 4:1 GQA, untied embeddings."""
    heads = hidden // 64
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )


def _write_layer_checkpoints(root: Path, hidden: int, inter: int, vocab: int, count: int) -> tuple[Path, list[Path]]:
    """One-layer Llama checkpoints in float32 (base and ``count`` dense fine-tunes, spectra as in
    `_weight`): every 2-D weight (embeddings and ``lm_head`` included) is decoupled."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(2)
    config = _llama_config(hidden, inter, 1, vocab, "float32")
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes.update({f"model.layers.0.{k}.weight": v for k, v in _shapes(hidden, inter).items()})
    base = {k: _weight(*v, gen) for k, v in shapes.items()}
    norms = {k: torch.ones(hidden) for k in ("model.norm.weight", "model.layers.0.input_layernorm.weight")}
    norms["model.layers.0.post_attention_layernorm.weight"] = torch.ones(hidden)
    experts = [dict(zip(base, (_experts(w, 1, gen)[0] for w in base.values()))) for _ in range(count)]
    dirs = []
    for j, state in enumerate([base, *experts]):
        d = root / f"layer{j}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file({**state, **norms}, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs[0], dirs[1:]


def _load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def bench_file_to_file(quick: bool, repeats: int = 2) -> list[dict]:
    """`merge_models` file to file (read, merge, write, report) on a one-layer Llama checkpoint
    against `baseline_merge` on every 2-D weight already in memory, alternating (baseline, ours,
    baseline, ours ...), medians; ``target="global"``, TA, 5 experts. Accuracy: each written weight
    against `merge_models(..., solver="svd")` in float64, the largest relative Frobenius distance."""
    from peft_orthomerge import merge_models

    hidden, inter, vocab = (256, 704, 128) if quick else (1024, 2816, 512)
    count = 5
    weights = [1.0 / count] * count
    _warm_up(torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-f2f-") as tmp:
        base, experts = _write_layer_checkpoints(Path(tmp), hidden, inter, vocab, count)
        w0s = _load_dir(base)
        wss = [_load_dir(e) for e in experts]
        names = [k for k, v in w0s.items() if v.dim() == 2]

        per_tensor: dict[str, list[float]] = {k: [] for k in names}  # baseline seconds of each weight, every run

        def baseline() -> None:
            for k in names:
                per_tensor[k].append(_timed(baseline_merge, w0s[k], [ws[k] for ws in wss], weights)[0])

        ref_dir = Path(tmp) / "ref"
        merge_models(str(base), [str(e) for e in experts], str(ref_dir), solver="svd")
        exact = _load_dir(ref_dir)
        for precision in ("float64", "float32"):
            times = {"baseline": [], "ours": []}
            out = Path(tmp) / f"out-{precision}"
            for _rep in range(repeats):
                times["baseline"].append(_timed(baseline)[0])
                if out.exists():
                    shutil.rmtree(out)
                times["ours"].append(
                    _timed(merge_models, str(base), [str(e) for e in experts], str(out), precision=precision)[0]
                )
            got = _load_dir(out)
            err = max(_rel(got[k], exact[k].double()) for k in names)
            med = {k: statistics.median(v) for k, v in times.items()}
            split, in_memory = _per_tensor(w0s, wss, weights, per_tensor, getattr(torch, precision))
            rows.append(
                dict(
                    name=f"merge_models file to file, precision {precision} (1 layer, hidden {hidden}, {count} experts)",
                    baseline=med["baseline"],
                    ours=med["ours"],
                    ratio=med["baseline"] / med["ours"],
                    unit="s",
                    notes=f"baseline: plain fp32 Algorithm 2 on the {len(names)} 2-D weights in memory; ours reads, "
                    f"merges and writes; max rel. error vs the float64 SVD answer {err:.1e}; medians of {repeats}; "
                    f"per tensor in memory (`decouple_merge` in {precision}, one run, against the baseline's median): "
                    f"{split} (their sum {in_memory:.1f} s)",
                )
            )
    return rows


def _per_tensor(
    w0s: dict[str, torch.Tensor],
    wss: list[dict[str, torch.Tensor]],
    weights: list[float],
    baseline_s: dict[str, list[float]],
    dtype: torch.dtype,
) -> tuple[str, float]:
    """Each weight's ratio, the baseline's median over ``baseline_s`` against one in-memory
    `decouple_merge` in ``dtype``, as ``"name ratio"`` items; and the sum of those `decouple_merge`
    seconds (to set against `merge_models` file to file)."""
    items, total = [], 0.0
    for k, runs in baseline_s.items():
        seconds = _timed(decouple_merge, w0s[k], [ws[k] for ws in wss], weights, "global", "ta", dtype=dtype)[0]
        total += seconds
        label = k.removesuffix(".weight").split(".")[-1]
        items.append(f"{label} {statistics.median(runs) / seconds:.1f}x")
    return ", ".join(items), total


# -- merge_models memory (child process) ----------------------------------------------------------
def _write_checkpoints(root: Path, quick: bool, experts: int) -> tuple[Path, list[Path], int]:
    """Llama-shaped bf16 checkpoints: the base and ``experts`` dense fine-tunes of it."""
    from safetensors.torch import save_file

    hidden, inter, layers, vocab = (256, 704, 2, 4000) if quick else (1024, 2816, 8, 32000)
    config = _llama_config(hidden, inter, layers, vocab, "bfloat16")
    gen = torch.Generator().manual_seed(1)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    kv = config["num_key_value_heads"] * 64
    for i in range(layers):
        for name, (out, n) in _shapes(hidden, inter).items():
            shapes[f"model.layers.{i}.{name}.weight"] = (kv if name.endswith(("k_proj", "v_proj")) else out, n)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    base = {k: (0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16) for k, s in shapes.items()}
    dirs = []
    for j in range(experts + 1):
        d = root / f"m{j}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        state = (
            base
            if j == 0
            else {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                for k, v in base.items()
            }
        )
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        del state
        dirs.append(d)
    return dirs[0], dirs[1:], (dirs[0] / "model.safetensors").stat().st_size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(args: dict) -> dict:
    torch.set_num_threads(1)
    import peft  # noqa: F401  (imports are not what we measure)
    import transformers  # noqa: F401

    from peft_orthomerge import merge_models

    rss0, anon0, file0 = _status_kb("VmRSS"), _status_kb("RssAnon"), _status_kb("RssFile")
    peak_anon, peak_file = [anon0], [file0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
            peak_file[0] = max(peak_file[0], _status_kb("RssFile"))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    merge_models(
        args["base"],
        args["experts"],
        args["output"],
        residual=args["residual"],
        target=args.get("target", "global"),
        precision=args.get("precision", "float64"),
    )
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    # VmHWM: this address space's peak RSS, file pages included (getrusage's ru_maxrss would also
    # carry the parent's peak across exec: the parent wrote the checkpoints)
    hwm = _status_kb("VmHWM")
    return {
        "seconds": seconds,
        "rss_mb": (hwm - rss0) / 1024,
        "anon_mb": (max(peak_anon[0], _status_kb("RssAnon")) - anon0) / 1024,
        "file_mb": (peak_file[0] - file0) / 1024,
        "imports_mb": rss0 / 1024,
    }


def bench_memory(
    quick: bool,
    residuals: Sequence[str] | None = None,
    echo: bool = False,
    targets: Sequence[str | None] = ("global",),
) -> list[dict]:
    """Peak RSS of `merge_models` (base + experts, bf16) in a fresh child, above its footprint after imports.

    ``residuals``: the residual methods to measure (default ``ta``, and ``ties`` in the full run);
    ``targets``: the decoupling targets (``None``: no decoupling), each with every residual;
    ``echo``: print each row as soon as it is measured."""
    experts = 2 if quick else 5
    if residuals is None:
        residuals = ("ta",) if quick else ("ta", "ties")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decouple-") as tmp:
        base, tuned, size = _write_checkpoints(Path(tmp), quick, experts)
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        for target, residual in ((t, r) for t in targets for r in residuals):
            args = {
                "base": str(base),
                "experts": [str(e) for e in tuned],
                "output": str(Path(tmp) / f"out-{target}-{residual}"),
                "residual": residual,
                "target": target,
            }
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, env=env
            )
            if out.returncode != 0:
                raise RuntimeError(f"merge_models child failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            mb = size / 1024**2
            rows.append(
                dict(
                    name=f"merge_models peak RSS, {target}+{residual} ({'2' if quick else '8'} layers, bf16, {experts} experts)",
                    baseline=mb,
                    ours=res["rss_mb"],
                    ratio=res["rss_mb"] / mb,
                    unit="MB",
                    notes=f"baseline = one checkpoint; ours = peak RSS above the child's {res['imports_mb']:.0f} MB after imports "
                    f"(file pages included); peak anonymous {res['anon_mb']:.0f} MB, file-backed {res['file_mb']:.0f} MB; {res['seconds']:.1f} s",
                )
            )
            if echo:
                _print_row(rows[-1])
    return rows


def _print_row(row: dict) -> None:
    print(
        f"{row['name']:<70} baseline {row['baseline']:10.3f} ours {row['ours']:10.3f} ratio {row['ratio']:7.2f}  {row['notes']}",
        flush=True,
    )


def run(quick: bool = True) -> list[dict]:
    torch.set_num_threads(1)
    return bench_layer(quick) + bench_file_to_file(quick) + bench_memory(quick)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        sys.exit(0)
    chosen = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--residuals=")]
    targets = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--targets=")]
    if "--memory-only" in sys.argv:  # rows printed as they are measured
        chosen_targets = [None if t == "none" else t for t in targets[0]] if targets else ["global"]
        bench_memory("--quick" in sys.argv, chosen[0] if chosen else None, echo=True, targets=chosen_targets)
    elif "--time-only" in sys.argv:  # the timing rows, no memory children
        torch.set_num_threads(1)
        for row in bench_layer("--quick" in sys.argv) + bench_file_to_file("--quick" in sys.argv):
            _print_row(row)
    else:
        for row in run(quick="--quick" in sys.argv):
            _print_row(row)
