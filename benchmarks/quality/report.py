"""Markdown table, claim checks and PNG plot of the small-scale replica's results."""

from __future__ import annotations

import math
from pathlib import Path

from peft_orthomerge.compare import format_table

# Differences of average accuracy below this are reported as inconclusive: the standard error of
# one task's per-symbol accuracy on 512 x 6 symbols is about 0.009, and this is a single seed.
TIE = 0.01


def _rows_by_method(rows: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in rows if not r.get("error")}


def _label(method: str, tasks: list[str]) -> str:
    if method.startswith("single:"):
        path = Path(method[len("single:") :])
        return f"single adapter: {path.name}"
    return method


def _table(rows: list[dict], tasks: list[str]) -> str:
    shown = []
    for r in rows:
        row = dict(r)
        row["method"] = _label(r["method"], tasks)
        row["merge s"] = r.get("seconds")
        if not r.get("error"):
            row["exact avg"] = sum(r[f"{t}:em"] for t in tasks) / len(tasks)
        shown.append(row)
    return format_table(shown, columns=[*tasks, "average", "exact avg", "lm_loss", "lm_acc", "merge s"])


def _best_of(by: dict[str, dict], names: list[str], key: str = "average") -> tuple[str, float] | None:
    present = [(n, by[n][key]) for n in names if n in by]
    return max(present, key=lambda p: p[1]) if present else None


def claims(results: dict) -> list[str]:
    """Each paper claim checked against this run's numbers (a line stating what came out)."""
    lines: list[str] = []
    oft = _rows_by_method(results["oft"])
    lora = _rows_by_method(results["lora"])
    euclid = [m for m in ("ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao") if m in oft]

    def verdict(diff: float) -> str:
        """``diff`` > 0 means the paper's claim holds; differences below ``TIE`` are inconclusive."""
        if abs(diff) < TIE:
            return f"**inconclusive** (difference {diff:+.3f}, below {TIE})"
        return "**reproduced**" if diff > 0 else "**not reproduced**"

    if "orthomerge" in oft and euclid:
        best = _best_of(oft, euclid)
        om = oft["orthomerge"]["average"]
        lines.append(
            f"- Table 1 (OrthoMerge beats Euclidean merges of the folded OFT weights): {verdict(om - best[1])} "
            f"at this scale: OrthoMerge average {om:.3f} vs best Euclidean `{best[0]}` {best[1]:.3f}."
        )
        ta_loss = oft.get("ta", {}).get("lm_loss")
        if ta_loss is not None:
            lines.append(
                f"- Retention (out-of-domain columns): held-out language loss OrthoMerge {oft['orthomerge']['lm_loss']:.3f} "
                f"vs TA {ta_loss:.3f} vs base {oft['base']['lm_loss']:.3f} (lower is better): "
                f"{verdict(ta_loss - oft['orthomerge']['lm_loss'])}."
            )
    ablations = [m for m in ("mean_q", "mean_r", "product_r") if m in oft]
    if "orthomerge" in oft and ablations:
        om = oft["orthomerge"]["average"]
        parts = ", ".join(f"`{m}` {oft[m]['average']:.3f}" for m in ablations)
        margin = min(om - oft[m]["average"] for m in ablations)
        lines.append(
            f"- Table 4 (magnitude-corrected so(b) mean beats the ablations): {verdict(margin)}: OrthoMerge {om:.3f}; {parts}."
        )
    if "karcher" in oft and "orthomerge" in oft:
        lines.append(
            f"- Karcher mean on SO(b) (not in the paper's tables): average {oft['karcher']['average']:.3f} "
            f"vs OrthoMerge {oft['orthomerge']['average']:.3f}."
        )
    residuals = [m for m in ("ta", "ties", "dare_ta", "dare_ties", "tsvm", "fisher_rao") if m in lora]
    for suffix, name in (("+G", "OrthoMerge-G"), ("+C", "OrthoMerge-C")):
        pairs = [(r, lora[r]["average"], lora[r + suffix]["average"]) for r in residuals if r + suffix in lora]
        if pairs:
            wins = sum(after - before >= TIE for _, before, after in pairs)
            losses = sum(before - after >= TIE for _, before, after in pairs)
            detail = ", ".join(f"{r} {b:.3f}->{a:.3f}" for r, b, a in pairs)
            lines.append(
                f"- Tables 2-3 ({name} improves each Euclidean method on LoRA): improved {wins}/{len(pairs)}, "
                f"worse {losses}/{len(pairs)}, the rest within {TIE}: {detail}."
            )
    for kind, name in (("oft", "OFT"), ("lora", "LoRA")):
        pts = results.get("scaling", {}).get(kind, [])
        ks = sorted({p["k"] for p in pts})
        if len(ks) >= 2:
            first, last = ks[0], ks[-1]
            by = {(p["method"], p["k"]): p["gain"] for p in pts}
            methods = sorted({p["method"] for p in pts}, key=lambda m: [p["method"] for p in pts].index(m))
            drops = ", ".join(
                f"`{m}` {by[(m, first)]:+.3f}->{by[(m, last)]:+.3f}"
                for m in methods
                if (m, first) in by and (m, last) in by
            )
            lines.append(f"- Figure 5 ({name}, gain over base from {first} to {last} merged tasks): {drops}.")
    return lines


def _c_sentence(results: dict) -> str:
    c = results.get("magnitude_factor", {})
    if "c_mean" not in c:
        return ""
    return (
        f"OrthoMerge's magnitude factor over the {len(results['tasks'])} OFT adapters: c = {c['c_mean']:.2f} on "
        f"average (min {c['c_min']:.2f}, max {c['c_max']:.2f}); c = 1 means all task rotations point the same "
        f"way in so(b), c = {c['sqrt_n']:.2f} (sqrt N) that they are mutually orthogonal, so OrthoMerge rescales "
        "the averaged rotation by this factor."
    )


def markdown(results: dict, smoke: bool = False) -> str:
    tasks = results["tasks"]
    cfg = results["config"]
    log = results.get("train_log", {})
    pre = log.get("pretrain", {})
    out = [
        "# Small-scale replica of OrthoMerge's experiments" + (" (SMOKE RUN: numbers meaningless)" if smoke else ""),
        "",
        "Generated by `python -m benchmarks.quality.run` "
        f"(single seed {cfg['seed']}, total {results['seconds']:.0f} s on CPU). A tiny Llama (hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers, {cfg['heads']} heads / {cfg['kv_heads']} KV heads) pretrained from scratch for "
        f"{cfg['pretrain_steps']} steps on Markov 'language' text mixed with {cfg['task_fraction']:.0%} task examples; "
        f"one OFT adapter (block size {cfg['oft_block_size']}, Cayley-Neumann) and one LoRA adapter (r={cfg['lora_r']}, "
        f"alpha={cfg['lora_alpha']}) per task, {cfg['adapter_steps']} steps each, on q/k/v/o/gate/up/down. "
        "Tasks (see `benchmarks/quality/data.py`): " + ", ".join(f"`{t}`" for t in tasks) + ".",
        "",
        (
            "Columns: per-task accuracy of the answer symbols under teacher forcing, `average` over tasks, `exact avg` "
            "the average exact match (all answer symbols right), `lm_loss` / `lm_acc` = cross-entropy / next-token accuracy on held-out language text (retention, "
            "the analogue of the paper's out-of-domain columns; lower loss is better), `merge s` = merge time. "
            "Rows `single adapter` are each adapter alone (the per-task ceiling); merges are uniform-weight. "
            "OFT Euclidean rows merge the folded weights `W0 @ blockdiag(R_i)^T`; LoRA rows `X` are `target=None`, "
            "`X+G` / `X+C` decouple with the global / conflict-aware target and merge the residuals with `X`."
        ),
        "",
        f"Base pretraining loss {pre.get('loss', math.nan):.3f}. " + _c_sentence(results),
        "",
        "## OFT adapters (paper Tables 1 and 4)",
        "",
        _table(results["oft"], tasks),
        "",
        "## LoRA adapters (paper Tables 2 and 3)",
        "",
        _table(results["lora"], tasks),
        "",
        "## Gain over the base as the number of merged tasks grows (paper Figure 5)",
        "",
        "Average per-symbol accuracy over the first k tasks (in the order of the table columns) of the merged model minus the base's on the same tasks.",
        "",
    ]
    for kind in ("oft", "lora"):
        pts = results.get("scaling", {}).get(kind, [])
        ks = sorted({p["k"] for p in pts})
        methods = list(dict.fromkeys(p["method"] for p in pts))
        by = {(p["method"], p["k"]): p["gain"] for p in pts}
        out += [
            f"{kind.upper()}:",
            "",
            "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for m in methods:
            out.append(f"| {m} | " + " | ".join(f"{by[(m, k)]:+.3f}" if (m, k) in by else "" for k in ks) + " |")
        out.append("")
    out += [
        "## The paper's claims at this scale",
        "",
        f"Checked automatically from the numbers above; differences below {TIE} are called inconclusive.",
        "",
        *claims(results),
        "",
        (
            "Caveats: one seed, one tiny model (a few hundred thousand parameters), synthetic tasks, uniform "
            "weights and default hyper-parameters for every method (no tuning of lambda or density, as "
            "the paper's baselines were tuned). Each adapter is trained on its task with "
            f"{cfg.get('adapter_replay', 0):.0%} of every batch replayed from the pretraining mixture; a 2-layer "
            "model still forgets much of the other tasks (compare the `single adapter` rows with `base`), "
            "so interference between the adapters is much stronger than between LLM experts. Treat the "
            "tables as evidence that every method runs end to end and as a qualitative picture, not as "
            "a benchmark."
        ),
        "",
        "![results](quality.png)",
        "",
    ]
    return "\n".join(out)


def write_plot(results: dict, path: Path) -> None:
    """Three panels: OFT averages, LoRA averages (bars, with retention loss), gain vs k (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [1.2, 1.6, 1]})
    for ax, kind in zip(axes[:2], ("oft", "lora")):
        rows = [r for r in results[kind] if not r.get("error") and not r["method"].startswith("single:")]
        singles = [r for r in results[kind] if not r.get("error") and r["method"].startswith("single:")]
        names = [r["method"] for r in rows]
        colors = [
            "tab:gray"
            if n == "base"
            else "tab:blue"
            if ("+" in n or n.startswith(("orthomerge", "karcher", "mean_q", "product_r")))
            else "tab:orange"
            for n in names
        ]
        ax.bar(range(len(rows)), [r["average"] for r in rows], color=colors)
        top = max(r["average"] for r in rows)
        if singles:
            ceiling = sum(r["average"] for r in singles) / len(singles)
            ax.axhline(ceiling, color="k", ls="--", lw=1, label="single adapters (mean of their averages)")
            top = max(top, ceiling)
        ax.set_ylim(0, top * 1.3)  # head room for the legend
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("average per-symbol accuracy over tasks")
        ax.set_title(f"{kind.upper()}: merged {len(results['tasks'])} tasks (blue = orthogonal, orange = Euclidean)")
        ax2 = ax.twinx()
        ax2.plot(range(len(rows)), [r["lm_loss"] for r in rows], "r.", label="held-out LM loss (right)")
        ax2.set_ylabel("held-out language loss", color="r")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax = axes[2]
    for kind, style in (("oft", "-o"), ("lora", "--s")):
        pts = results.get("scaling", {}).get(kind, [])
        for m in dict.fromkeys(p["method"] for p in pts):
            sel = sorted((p["k"], p["gain"]) for p in pts if p["method"] == m)
            ax.plot([k for k, _ in sel], [g for _, g in sel], style, label=f"{kind}: {m}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(sorted({p["k"] for pts in results.get("scaling", {}).values() for p in pts}))
    ax.set_xlabel("number of merged tasks k")
    ax.set_ylabel("gain over base (avg accuracy on the k tasks)")
    ax.set_title("Figure 5 analogue")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
