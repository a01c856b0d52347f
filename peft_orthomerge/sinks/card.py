"""Model cards (``README.md`` with Hub metadata) for every output the library writes.

The front matter follows the Hub's model card metadata: ``library_name`` (``peft`` for adapters,
``transformers`` for full models), ``base_model`` (only when it is a Hub repo id; local paths are
named in the text instead, since the Hub rejects them), ``base_model_relation`` and
``tags: [merge, orthomerge, ...]``. The body lists inputs and weights, the method and its
parameters, the library version and a per-module table capped at `MAX_TABLE_ROWS` rows (the full
statistics are in ``orthomerge_report.json``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..report import REPORT_FILE, MergeReport
from ..sources.resolve import looks_like_hub_ref, resolved_revision, split_revision

PAPER = "Orthogonal Model Merging (Yang, Shi, Liu, ICML 2026)"
MAX_TABLE_ROWS = 24
TITLES = {"oft": "Merged OFT adapter", "lora": "Merged LoRA adapters", "full": "Merged model"}


def _is_hub_id(ref: str | None) -> bool:
    return bool(ref) and looks_like_hub_ref(ref) and not Path(ref).expanduser().exists()


def record_revisions(report: MergeReport, base_model: str | None = None) -> None:
    """Add to ``report.revisions`` the commit hash each Hub input (and ``base_model``) resolved to."""
    for ref in [*report.inputs, *([base_model] if base_model else [])]:
        commit = resolved_revision(ref) if _is_hub_id(ref) else None
        if commit is not None:
            report.revisions[ref] = commit


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _front_matter(report: MergeReport, base_model: str | None, library_name: str | None) -> list[str]:
    """The Hub metadata block: library, base model and its relation, tags."""
    meta: dict = {"library_name": library_name or "transformers"}
    if _is_hub_id(base_model):
        meta["base_model"] = split_revision(base_model)[0]  # the Hub's metadata names the repo only
        meta["base_model_relation"] = "adapter" if library_name == "peft" else "merge"
    meta["tags"] = ["merge", "orthomerge", "peft-orthomerge", report.kind]
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]


def _method_lines(report: MergeReport, version: str) -> list[str]:
    """Inputs with weights, the method's parameters and the summary of magnitude factors and errors."""
    lines = ["## Inputs", "", "| # | input | weight | revision |", "|---|---|---|---|"]
    lines += [
        f"| {i} | `{_cell(ref)}` | {w:.4f} | {_revision_cell(report, ref)} |"
        for i, (ref, w) in enumerate(zip(report.inputs, report.weights))
    ]
    lines += ["", "Weights are normalised to sum to 1.", "", "## Method", "", f"- method: `{report.method}`"]
    lines += [f"- {k}: `{_cell(v)}`" for k, v in report.params.items()]
    lines.append(f"- peft-orthomerge version: `{version}`")
    stats = report.summary_stats()
    if "c_mean" in stats:
        lines.append(
            f"- magnitude factor c over {int(stats['modules'])} modules: mean {stats['c_mean']:.4f}, "
            f"min {stats['c_min']:.4f}, max {stats['c_max']:.4f}"
        )
    if "orthogonality_error_max" in stats:
        lines.append(f"- largest orthogonality error of a merged rotation: {stats['orthogonality_error_max']:.2e}")
    return lines


def _revision_cell(report: MergeReport, ref: str) -> str:
    commit = report.revisions.get(ref)
    return "-" if commit is None else f"`{commit}`"


def _usage_lines(base_model: str | None, is_adapter: bool) -> list[str]:
    lines = ["", "## Usage", "", "```python"]
    if is_adapter:
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_ADAPTER")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")',
        ]
    return [*lines, "```", ""]


def render_model_card(report: MergeReport, *, base_model: str | None = None, library_name: str | None = None) -> str:
    """Return a model card: YAML front matter for the Hub, then inputs, method, usage and a module table.

    ``library_name="peft"`` marks an adapter (the card shows how to load it with `PeftModel`);
    anything else is a full model loadable with transformers.
    """
    from .. import __version__

    title = TITLES.get(report.kind, "Merged model")
    lines = _front_matter(report, base_model, library_name)
    lines += [
        f"# {title}",
        "",
        f"Merged with peft-orthomerge {__version__}, method `{report.method}`, following {PAPER}.",
        "",
    ]
    if base_model:
        commit = report.revisions.get(base_model)
        lines += [f"Base model: `{base_model}`" + (f" (commit `{commit}`)" if commit else ""), ""]
    lines += _method_lines(report, __version__)
    lines += _usage_lines(base_model, library_name == "peft")
    if report.modules:
        lines += _module_table(report)
    if report.passthrough:
        shown = report.passthrough[:MAX_TABLE_ROWS]
        more = len(report.passthrough) - len(shown)
        names = ", ".join(f"`{n}`" for n in shown) + (f" and {more} more" if more else "")
        lines += ["", "Tensors merged by weighted mean: " + names]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {_cell(w)}" for w in report.warnings]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {_cell(n)}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def _module_table(report: MergeReport) -> list[str]:
    modules = report.modules
    lines = [
        "## Per-module summary",
        "",
        "| module | c | weighted mean input norm | merged norm | orthogonality error |",
        "|---|---|---|---|---|",
    ]
    half = MAX_TABLE_ROWS // 2
    shown = modules if len(modules) <= MAX_TABLE_ROWS else modules[:half] + modules[-half:]
    for i, m in enumerate(shown):
        if len(modules) > MAX_TABLE_ROWS and i == half:
            lines.append(f"| ... {len(modules) - MAX_TABLE_ROWS} more modules (see `{REPORT_FILE}`) | | | | |")
        mean_in = report.weighted_input_norm(m)
        c = "-" if m.magnitude_factor is None else f"{m.magnitude_factor:.4f}"
        err = "-" if m.orthogonality_error is None else f"{m.orthogonality_error:.2e}"
        lines.append(f"| `{_cell(m.name)}` | {c} | {mean_in:.4g} | {m.merged_norm:.4g} | {err} |")
    return lines


def write_model_card(directory: str | Path, report: MergeReport, **kwargs) -> Path:
    """Write ``README.md`` into ``directory``; keyword arguments as in `render_model_card`."""
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(report, **kwargs))
    return path


def write_report_files(
    directory: str | Path, report: MergeReport, *, base_model: str | None = None, library_name: str | None = None
) -> None:
    """Write an output's ``orthomerge_report.json`` and ``README.md`` model card: the one place both are
    written. The commit hashes of Hub inputs and base are recorded first (`record_revisions`)."""
    write_report_json(directory, report, base_model=base_model)
    write_model_card(directory, report, base_model=base_model, library_name=library_name)


def write_report_json(directory: str | Path, report: MergeReport, *, base_model: str | None = None) -> Path:
    """Write ``orthomerge_report.json`` into ``directory`` (also by a recipe run, whose own atomic
    directory records the final output path), with the commit hashes of Hub inputs and
    ``base_model`` (`record_revisions`); return its path."""
    record_revisions(report, base_model)
    path = Path(directory) / REPORT_FILE
    report.to_json(path)
    return path
