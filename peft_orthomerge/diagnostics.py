"""``peft-orthomerge report OUTPUT_DIR``: diagnostics of a finished merge, as JSON and PNG plots.

Read from ``orthomerge_report.json`` (always available):

- magnitude factor ``c`` per layer and module type (OFT merges);
- input norms against the merged norm per layer (root of the sum of squares over the layer's modules);
- for decoupled merges, the norms of the orthogonal part, the residual and the full task vector
  per module type (means over modules and inputs; from `ModuleStats.extra`).

Computed when the inputs / base model recorded with the merge are reachable:

- the task-by-task cosine matrix (`peft_orthomerge.inspection.relate`);
- how far the merged weights moved from the base, per weight matrix: relative change of the
  spectral norm ``(s1(W) - s1(W0)) / s1(W0)`` (exact up to 1024 rows/columns, else 100 power
  iterations; at most `MAX_DRIFT_MATRICES` matrices, evenly spaced over the depth) and of the hyperspherical energy
  ``HE(W) = sum_{i != j} 1 / ||w_i/|w_i| - w_j/|w_j|||`` over the rows (neurons, torch layout
  ``(out, in)``; at most `HE_MAX_ROWS` rows, the same rows for ``W`` and ``W0``). Rotating the
  input side (``W0 @ R^T`` with orthogonal ``R``) leaves both unchanged, so an exact-Cayley OFT
  merge shows zero up to rounding. PEFT's default Cayley-Neumann series (``use_cayley_neumann``)
  is not exactly orthogonal: for OFT outputs each row also records ``orthogonality_error``, the
  largest ``||R_k^T R_k - I||_F`` over the blocks of the rotation the output applies (``None`` for
  outputs that are not rotations of the base), and the plot shows it beside the drift.

Plots (`peft_orthomerge.diagnostic_plots`) need matplotlib (``pip install 'peft-orthomerge[plots]'``);
they are drawn on plain figures (Agg), without pyplot, so the process's matplotlib backend is left alone.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, OrthoMergeError
from .ops.orthogonality import max_orthogonality_error
from .progress import progress
from .report import REPORT_FILE, MergeReport, ModuleStats
from .sinks.output import atomic_output_dir
from .sources.jsonfile import read_json_object
from .sources.resolve import resolve_source
from .sources.tensors import TensorReader

HE_MAX_ROWS = 512
EXACT_SPECTRAL_MAX_DIM = 1024  # larger matrices: power iteration
POWER_ITERATIONS = 100
MAX_DRIFT_MATRICES = 256
DIAGNOSTICS_DIR = "diagnostics"
# `ModuleStats.extra` key prefixes of decoupled merges (peft_orthomerge.ops.decouple.DecoupleStats):
# ``<prefix>_<i>`` for input i.
DECOUPLED_KEYS = {
    "orthogonal part": "orth_part_norm",
    "residual": "residual_norm",
    "full task vector": "task_vector_norm",
}

_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_type(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj(.weight)`` -> ``(3, "self_attn.q_proj")``; no index -> ``(None, name)``."""
    name = name.removesuffix(".weight")
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


# -- statistics from the report -------------------------------------------------------------------
def per_layer_stats(report: MergeReport) -> dict[str, Any]:
    """c per (module type, layer), and per-layer input / merged norms (root of sums of squares)."""
    c: dict[str, dict[int, float]] = defaultdict(dict)
    n_inputs = len(report.inputs)
    sq_in: dict[int, list[float]] = defaultdict(lambda: [0.0] * n_inputs)
    sq_merged: dict[int, float] = defaultdict(float)
    indexed = any(layer_and_type(m.name)[0] is not None for m in report.modules)
    for i, m in enumerate(report.modules):
        layer, mtype = layer_and_type(m.name)
        if layer is None:
            if indexed:
                continue  # embeddings, lm_head, ...: not part of a layer (still in the report)
            layer = i
        if m.magnitude_factor is not None:
            c[mtype][layer] = m.magnitude_factor
        for k, v in enumerate(m.input_norms[:n_inputs]):
            sq_in[layer][k] += v * v
        sq_merged[layer] += m.merged_norm**2
    layers = sorted(sq_merged)
    return {
        "axis": "layer" if indexed else "module index",
        "layers": layers,
        "magnitude_factor": {t: {str(k): v for k, v in sorted(d.items())} for t, d in sorted(c.items())},
        "input_norms": [[math.sqrt(sq_in[layer][k]) for layer in layers] for k in range(n_inputs)],
        "merged_norm": [math.sqrt(sq_merged[layer]) for layer in layers],
    }


def decoupled_stats(modules: list[ModuleStats]) -> dict[str, dict[str, float]]:
    """Mean norm (over modules and inputs) of the orthogonal part ``||W0 P_i - W0||``, the residual
    ``||rho_i||`` and the full task vector ``||W_i - W0||``, per module type."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in modules:
        values = {
            label: [v for k, v in m.extra.items() if re.fullmatch(rf"{prefix}_\d+", k)]
            for label, prefix in DECOUPLED_KEYS.items()
        }
        if not all(values.values()):
            continue
        _, mtype = layer_and_type(m.name)
        for label, vs in values.items():
            sums[mtype][label].extend(float(v) for v in vs)
    return {t: {label: sum(v) / len(v) for label, v in d.items()} for t, d in sorted(sums.items())}


# -- drift from the base --------------------------------------------------------------------------
def hyperspherical_energy(weight: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """``sum_{i != j} 1 / ||w_i/|w_i| - w_j/|w_j|||`` over the rows ``rows`` (all if ``None``) of ``weight``."""
    w = weight.reshape(weight.shape[0], -1).double()
    if rows is not None:
        w = w[rows]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    dist = torch.cdist(w, w)
    off = ~torch.eye(w.shape[0], dtype=torch.bool)
    return float((1.0 / dist[off].clamp_min(1e-12)).sum())


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value: exact (SVD) up to `EXACT_SPECTRAL_MAX_DIM`, else power iteration.

    The iteration runs on ``W W^T`` from a fixed start vector, so two weights that differ by a
    rotation of the input side (``W0 @ R^T``) follow the same iterates and compare exactly.
    """
    w = weight.reshape(weight.shape[0], -1).double()
    if min(w.shape) <= EXACT_SPECTRAL_MAX_DIM:
        return float(torch.linalg.matrix_norm(w, ord=2))
    w = w.float()
    u = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    for _ in range(POWER_ITERATIONS):
        u = w @ (w.T @ u)
        u = u / u.norm().clamp_min(1e-30)
    return float((w.T @ u).norm())


def drift(base: torch.Tensor, merged: torch.Tensor) -> dict[str, float]:
    """Relative change of spectral norm and hyperspherical energy from ``base`` to ``merged``."""
    w0 = base.reshape(base.shape[0], -1).double()
    w = merged.reshape(merged.shape[0], -1).double()
    s0 = spectral_norm(w0)
    s1 = spectral_norm(w)
    rows = None
    if w0.shape[0] > HE_MAX_ROWS:
        rows = torch.linspace(0, w0.shape[0] - 1, HE_MAX_ROWS).round().long()
    he0 = hyperspherical_energy(w0, rows)
    he1 = hyperspherical_energy(w, rows)
    return {
        "spectral_norm_base": s0,
        "spectral_norm_rel_change": (s1 - s0) / s0 if s0 else 0.0,
        "he_rel_change": (he1 - he0) / he0 if he0 else 0.0,
        "relative_frobenius_change": float((w - w0).norm() / w0.norm()) if float(w0.norm()) else 0.0,
    }


def _merged_weights(output_dir: Path, report: MergeReport, base: TensorReader):
    """Yield ``(tensor name, merged weight loader, orthogonality error)`` for the merged 2-D weights of
    the output; the error (``max_k ||R_k^T R_k - I||_F`` of the blocks applied) only for OFT adapters."""
    if (output_dir / "adapter_config.json").is_file():
        config = read_json_object(output_dir / "adapter_config.json", what="adapter config")
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type == "OFT":
            from .ops.oft_fold import fold_weight
            from .ops.skew import peft_rotation, vec_to_skew
            from .sources.oft import read_adapter_dir

            adapter = read_adapter_dir(str(output_dir), output_dir)
            for name, mod in adapter.modules.items():
                key = f"{name}.weight"
                if key in base:
                    rotation = peft_rotation(
                        vec_to_skew(adapter.canonical(name), mod.b), adapter.use_cayley_neumann, adapter.terms
                    )
                    yield (
                        key,
                        lambda key=key, rotation=rotation, kind=mod.kind: fold_weight(
                            base.get(key), rotation, kind, name=key
                        ),
                        max_orthogonality_error(rotation),
                    )
            return
        if peft_type == "LORA":
            from .sources.lora import read_adapter_dir as read_lora_dir

            adapter = read_lora_dir(str(output_dir), output_dir)
            fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
            for name in adapter.modules:
                key = f"{name}.weight"
                if key in base:
                    yield (
                        key,
                        lambda key=key, name=name: adapter.expert_weight(
                            name, base.get(key).double(), fan_in_fan_out=fan_in_fan_out
                        ),
                        None,
                    )
            return
        raise InputError(f"unsupported adapter type {config.get('peft_type')!r}", path=output_dir)
    merged = TensorReader.from_dir(output_dir, "model")
    for key in merged.keys():
        if key in base and len(base.shape(key)) == 2 and base.shape(key) == merged.shape(key):
            yield key, lambda key=key: merged.get(key), None


def drift_stats(output_dir: Path, report: MergeReport, base: TensorReader) -> list[dict[str, Any]]:
    items = list(_merged_weights(output_dir, report, base))
    if len(items) > MAX_DRIFT_MATRICES:  # evenly spaced sample over the depth
        idx = torch.linspace(0, len(items) - 1, MAX_DRIFT_MATRICES).round().long().tolist()
        items = [items[i] for i in sorted(set(idx))]
    out = []
    for key, load, ortho in progress(items, desc="drift from base", unit="matrix"):
        layer, mtype = layer_and_type(key)
        out.append(
            {"name": key, "layer": layer, "type": mtype, **drift(base.get(key), load()), "orthogonality_error": ortho}
        )
    return out


# -- orchestration --------------------------------------------------------------------------------
def _recorded_base(output_dir: Path, report: MergeReport) -> str | None:
    for key in ("base_model", "fold_into", "base"):
        if isinstance(report.params.get(key), str):
            return report.params[key]
    recipe = output_dir / "orthomerge_recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            data = yaml.safe_load(recipe.read_text())
            if isinstance(data, dict) and data.get("base_model"):
                return str(data["base_model"])
        except yaml.YAMLError:
            pass
    config = output_dir / "adapter_config.json"
    if config.is_file():
        return read_json_object(config, what="adapter config").get("base_model_name_or_path") or None
    return None


def compute_diagnostics(output_dir: str | Path) -> dict[str, Any]:
    """All diagnostics of a finished output as a JSON-able dict (nothing written)."""
    output_dir = Path(output_dir).expanduser()
    report_file = output_dir / REPORT_FILE
    if not report_file.is_file():
        raise InputError(f"no {REPORT_FILE}: not a finished peft-orthomerge output", path=output_dir)
    try:
        report = MergeReport.from_json(report_file)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"invalid merge report ({type(exc).__name__}: {exc})", path=report_file) from None
    result: dict[str, Any] = {
        "kind": report.kind,
        "method": report.method,
        "inputs": report.inputs,
        "weights": report.weights,
        "summary": report.summary_stats(),
        "per_layer": per_layer_stats(report),
        "decoupled": decoupled_stats(report.modules),
        "notes": [],
    }
    base_ref = _recorded_base(output_dir, report)
    base = None
    if base_ref:
        try:
            base = TensorReader.from_dir(resolve_source(base_ref, kind="model"), "model")
        except OrthoMergeError as exc:
            result["notes"].append(f"base model not reachable, drift not computed: {exc}")
    else:
        result["notes"].append("no base model recorded, drift not computed")
    if report.kind in ("oft", "lora") or base is not None:
        from .inspection import inspect_sources

        try:
            rel = inspect_sources(list(report.inputs), base=base_ref if report.kind == "full" else None).get(
                "relations"
            )
            if rel:
                result["cosine"] = rel["cosine"]
                result["conflicting_row_share"] = rel["conflicting_row_share"]
        except OrthoMergeError as exc:
            result["notes"].append(f"inputs not reachable, cosine matrix not computed: {exc}")
    if base is not None:
        result["drift"] = drift_stats(output_dir, report, base)
    return result


def run_diagnostics(
    output_dir: str | Path, *, out: str | Path | None = None, plots: bool = True, overwrite: bool = False
) -> list[Path]:
    """Write ``report.json`` and PNG plots (default: ``OUTPUT_DIR/diagnostics``, replaced on rerun)."""
    return write_diagnostics(output_dir, out=out, plots=plots, overwrite=overwrite)[0]


def write_diagnostics(
    output_dir: str | Path, *, out: str | Path | None = None, plots: bool = True, overwrite: bool = False
) -> tuple[list[Path], dict[str, Any]]:
    """`run_diagnostics`, also returning the data written to ``report.json`` (with ``plots_skipped``:
    plot file name -> why it was not drawn)."""
    from .diagnostic_plots import require_matplotlib, skipped_plots, write_plots

    plt = require_matplotlib() if plots else None
    output_dir = Path(output_dir).expanduser()
    data = compute_diagnostics(output_dir)
    target = Path(out).expanduser() if out else output_dir / DIAGNOSTICS_DIR
    with atomic_output_dir(target, overwrite=overwrite or out is None) as tmp:
        names = write_plots(plt, data, tmp) if plt is not None else []
        data["plots"] = names
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    data["plots_skipped"] = skipped_plots(data, names) if plots else {}
    target = target.resolve()
    return [target / "report.json", *(target / n for n in names)], data


def format_summary(data: dict[str, Any]) -> str:
    """A short console summary of `compute_diagnostics`' data: method, inputs, statistics, notes, skipped plots."""
    lines = [f"{data['kind']} merge, {data['method']}, {len(data['inputs'])} inputs:"]
    lines += [f"  {w:6.3f}  {ref}" for ref, w in zip(data["inputs"], data["weights"])]
    stats = data["summary"]
    lines.append(f"  modules merged: {int(stats.get('modules', 0))}")
    if "c_mean" in stats:
        lines.append(
            f"  magnitude factor c: mean {stats['c_mean']:.4f} (min {stats['c_min']:.4f}, max {stats['c_max']:.4f})"
        )
    if "orthogonality_error_max" in stats:
        lines.append(f"  max orthogonality error: {stats['orthogonality_error_max']:.3e}")
    if data.get("cosine"):
        n = len(data["cosine"])
        off = [data["cosine"][i][j] for i in range(n) for j in range(n) if i < j]
        lines.append(f"  task cosine between inputs: mean {sum(off) / len(off):.4f}, min {min(off):.4f}")
    if data.get("drift"):
        worst = max(abs(r["spectral_norm_rel_change"]) for r in data["drift"])
        lines.append(f"  largest relative spectral-norm change from the base: {worst:.3e}")
    lines += [f"  note: {n}" for n in data["notes"]]
    lines += [f"  plot skipped: {name}: {why}" for name, why in data.get("plots_skipped", {}).items()]
    return "\n".join(lines)
