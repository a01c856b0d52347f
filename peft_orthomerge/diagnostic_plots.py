"""PNG plots of `peft_orthomerge.diagnostics` data, one function per plot.

Figures are plain `matplotlib.figure.Figure` objects rendered by Agg when saved: pyplot is never
imported and the backend is never switched, so a caller's matplotlib settings (a notebook's
inline backend, say) are left as they were.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


class Figures:
    """The two pyplot calls the plots use (``subplots``, ``close``), on plain figures."""

    def __init__(self, figure_class: type) -> None:
        self._figure = figure_class

    def subplots(self, *args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any):
        fig = self._figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    def close(self, fig: Any) -> None:
        fig.clear()


def require_matplotlib() -> Figures:
    """`Figures`, or `ConfigError` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401 (the check: matplotlib itself, not only a submodule already loaded)
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "plots need matplotlib, which is not installed",
            hint="pip install 'peft-orthomerge[plots]', or run with --no-plots for report.json only.",
        ) from None
    return Figures(Figure)


def _short(ref: str, width: int = 18) -> str:
    name = Path(ref).name or ref
    return name if len(name) <= width else name[: width - 1] + "~"


def _magnitude_factor(plt: Any, data: dict[str, Any]):
    per_layer = data["per_layer"]
    if not per_layer["magnitude_factor"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for mtype, values in per_layer["magnitude_factor"].items():
        xs = [int(k) for k in values]
        ax.plot(xs, list(values.values()), marker="o", label=mtype)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set(title="Magnitude factor c per layer", xlabel=per_layer["axis"], ylabel="c = sum w_i |Q_i| / |sum w_i Q_i|")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def _norms_per_layer(plt: Any, data: dict[str, Any]):
    per_layer = data["per_layer"]
    if not per_layer["layers"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for ref, norms in zip(data["inputs"], per_layer["input_norms"]):
        ax.plot(per_layer["layers"], norms, marker=".", alpha=0.8, label=f"input {_short(ref)}")
    ax.plot(per_layer["layers"], per_layer["merged_norm"], color="black", linewidth=2.2, marker="o", label="merged")
    ax.set(
        title="Input norms vs merged norm per layer",
        xlabel=per_layer["axis"],
        ylabel="Frobenius norm (all modules of the layer)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _task_cosine(plt: Any, data: dict[str, Any]):
    cos = data.get("cosine")
    if not cos:
        return None
    n = len(cos)
    labels = [f"[{i}] {_short(r)}" for i, r in enumerate(data["inputs"])]
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.1 * n + 2))
    im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    for i in range(n):
        for j in range(n):
            color = "white" if abs(cos[i][j]) > 0.6 else "black"
            ax.text(j, i, f"{cos[i][j]:.2f}", ha="center", va="center", color=color)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(title="Task-by-task cosine similarity", xlabel="task", ylabel="task")
    fig.colorbar(im, ax=ax, label="cosine")
    return fig


def _decoupled_norms(plt: Any, data: dict[str, Any]):
    decoupled = data.get("decoupled")
    if not decoupled:
        return None
    types = list(decoupled)
    labels = list(decoupled[types[0]])  # the labels of `diagnostics.DECOUPLED_KEYS`, in order
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(types) + 2), 4))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(types))]
        ax.bar(xs, [decoupled[t][label] for t in types], width=width, label=label)
    ax.set_xticks(range(len(types)), types, rotation=20, ha="right")
    ax.set(
        title="Decoupled task vectors: orthogonal part vs residual", xlabel="module type", ylabel="mean Frobenius norm"
    )
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


def _drift_from_base(plt: Any, data: dict[str, Any]):
    """Spectral-norm and HE drift per layer and, for OFT outputs, the measured orthogonality error
    of the applied rotations beside them (an exact rotation leaves the drift at 0; PEFT's Neumann
    series does not: the error says how far from 0 to expect)."""
    if not data.get("drift"):
        return None
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    indexed = any(row["layer"] is not None for row in data["drift"])
    for i, row in enumerate(data["drift"]):
        if row["layer"] is None and indexed:
            continue  # not part of a layer; listed in report.json
        by_type[row["type"]].append({**row, "x": i if row["layer"] is None else row["layer"]})
    errors = [r["orthogonality_error"] for r in data["drift"] if r.get("orthogonality_error") is not None]
    fig, axes = plt.subplots(1, 3 if errors else 2, figsize=(16 if errors else 11, 4))
    for mtype, rows in by_type.items():
        xs = [r["x"] for r in rows]
        axes[0].plot(xs, [r["spectral_norm_rel_change"] for r in rows], marker="o", label=mtype)
        axes[1].plot(xs, [r["he_rel_change"] for r in rows], marker="o", label=mtype)
        if errors:
            axes[2].plot(xs, [max(r["orthogonality_error"], 1e-17) for r in rows], marker="o", label=mtype)
    axes[0].set(
        title="Spectral norm: change from base", xlabel="layer", ylabel="relative change (s1(W) - s1(W0)) / s1(W0)"
    )
    axes[1].set(title="Hyperspherical energy: change from base", xlabel="layer", ylabel="relative change of HE")
    for ax in axes[:2]:
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if errors:
        axes[2].set(
            title="Orthogonality error of the applied rotations",
            xlabel="layer",
            ylabel="max over blocks of ||R^T R - I||_F",
            yscale="log",
        )
    xs = sorted({r["x"] for rows in by_type.values() for r in rows})
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(xs if len(xs) <= 12 else xs[:: max(1, len(xs) // 12)])
        if len(xs) == 1:  # one layer: a readable range around it, not a degenerate one
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
    axes[0].legend(fontsize=8, ncol=2)
    if errors:
        worst = max(errors)
        note = (
            f"a rotation leaves both at 0 only if exactly orthogonal; measured orthogonality error up to {worst:.1e}"
            + (" (Cayley-Neumann series; cayley='exact' gives exact rotations)" if worst > 1e-10 else "")
        )
    else:
        note = "decoupled and Euclidean merges change both; an exact rotation of the input side would not"
    fig.suptitle(f"How far the merged weights moved from the base\n({note})", fontsize=9)
    return fig


PLOTS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "magnitude_factor.png": _magnitude_factor,
    "norms_per_layer.png": _norms_per_layer,
    "task_cosine.png": _task_cosine,
    "decoupled_norms.png": _decoupled_norms,
    "drift_from_base.png": _drift_from_base,
}


SKIP_REASONS = {
    "magnitude_factor.png": "no magnitude factors in the report (OFT merges with magnitude correction record them)",
    "norms_per_layer.png": "no per-layer norms in the report (no merged module statistics)",
    "task_cosine.png": "no cosine matrix (needs two or more reachable inputs; full merges also the base)",
    "decoupled_norms.png": "not a decoupled merge (no orthogonal part / residual norms recorded)",
    "drift_from_base.png": "no drift from the base (needs the base model, recorded and reachable)",
}


def skipped_plots(data: dict[str, Any], written: list[str]) -> dict[str, str]:
    """Plot file name -> why it was not drawn, for every plot not in ``written``."""
    return {name: SKIP_REASONS[name] for name in PLOTS if name not in written}


def write_plots(plt: Any, data: dict[str, Any], directory: Path) -> list[str]:
    """Write the PNG plots whose data is present; return their file names."""
    from matplotlib.ticker import MaxNLocator

    written: list[str] = []
    for name, draw in PLOTS.items():
        fig = draw(plt, data)
        if fig is None:
            continue
        for ax in fig.axes:
            if ax.get_xlabel() in ("layer", "module index"):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
