"""Model cards (``README.md`` with Hub metadata) for every output the library writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from .report import MergeReport

PAPER = "Orthogonal Model Merging (Yang, Shi, Liu, ICML 2026)"


def render_model_card(report: MergeReport, *, base_model: str | None = None, library_name: str | None = None) -> str:
    """Return a model card: YAML front matter for the Hub, then inputs, method and a module table."""
    from . import __version__

    meta: dict = {"tags": ["merge", "orthomerge", "peft-orthomerge"]}
    if library_name:
        meta["library_name"] = library_name
    if base_model:
        meta["base_model"] = base_model
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    title = {"oft": "Merged OFT adapter", "lora": "Merged LoRA adapters", "full": "Merged model"}.get(report.kind, "Merged model")
    lines += [f"# {title}", "", f"Produced by peft-orthomerge {__version__} with method `{report.method}` ({PAPER}).", ""]
    if base_model:
        lines += [f"Base model: `{base_model}`", ""]
    lines += ["## Inputs", "", "| input | weight |", "|---|---|"]
    lines += [f"| `{ref}` | {w:.4f} |" for ref, w in zip(report.inputs, report.weights)]
    lines += ["", "## Method", "", f"- method: `{report.method}`"]
    lines += [f"- {k}: `{v}`" for k, v in report.params.items()]
    stats = report.summary_stats()
    if "c_mean" in stats:
        lines += [
            f"- magnitude factor c over {int(stats['modules'])} modules: mean {stats['c_mean']:.4f}, "
            f"min {stats['c_min']:.4f}, max {stats['c_max']:.4f}"
        ]
    if report.modules:
        lines += ["", "## Per-module summary", "", "| module | c | mean input norm | merged norm | orthogonality error |", "|---|---|---|---|---|"]
        for m in report.modules:
            mean_in = sum(m.input_norms) / len(m.input_norms) if m.input_norms else float("nan")
            c = "-" if m.magnitude_factor is None else f"{m.magnitude_factor:.4f}"
            err = "-" if m.orthogonality_error is None else f"{m.orthogonality_error:.2e}"
            lines.append(f"| `{m.name}` | {c} | {mean_in:.4g} | {m.merged_norm:.4g} | {err} |")
    if report.passthrough:
        lines += ["", "Tensors merged by weighted mean: " + ", ".join(f"`{n}`" for n in report.passthrough)]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, report: MergeReport, **kwargs) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(report, **kwargs))
    return path
