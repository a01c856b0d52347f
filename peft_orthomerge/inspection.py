"""``peft-orthomerge inspect``: what adapters or checkpoints are, and how several of them relate.

Per input: type (OFT / LoRA adapter, full checkpoint), target modules, block sizes (OFT) or
ranks (LoRA), flags, dtypes, tensor count, parameter count and bytes on disk.

For several inputs of one type, the *task quantity* of each module is compared:

- OFT: the canonical skew blocks ``Q`` (sign conventions unified, see `peft_orthomerge.ops.skew`),
  as ``(r*b, b)`` rows; a module an adapter does not target has ``Q = 0``.
- LoRA: the task vector ``delta = scaling * B @ A`` in torch layout ``(out, in)``.
- Full checkpoints: ``tau = W_i - W0`` for every 2-D floating tensor (needs ``--base``).

Reported: per-module Frobenius norms per input, the pairwise cosine between the inputs' whole
task quantities (all modules concatenated), and per input the share of *conflicting rows*: rows
(torch ``dim=1``, one per output unit) whose cosine with the mean task quantity is negative,
as in the conflict-aware target of DESIGN §4. Work is done one module at a time in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import IncompatibleInputsError, InputError
from .progress import progress
from .sources.jsonfile import read_json_object
from .sources.resolve import resolve_source
from .sources.tensors import TensorReader
from .units import human_bytes

MAX_TEXT_ROWS = 20


# -- per input ------------------------------------------------------------------------------------
def _peft_type(config: dict[str, Any]) -> str:
    value = config.get("peft_type", "")
    return str(getattr(value, "value", value)).upper()


def _summary_of_tensors(reader: TensorReader) -> dict[str, Any]:
    dtypes: set[str] = set()
    params = 0
    for key in reader.keys():
        params += math.prod(reader.shape(key))
        dtypes.add(reader.storage_dtype(key))  # header only
    return {"tensors": len(reader), "parameters": params, "bytes": reader.nbytes(), "dtypes": sorted(dtypes)}


def _target_names(module_names: list[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in module_names})


def describe_source(ref: str, base: TensorReader | None = None) -> tuple[dict[str, Any], Any]:
    """Return (JSON-able description, loaded handle used by `relate`) for one input.

    ``base`` (optional) makes LoRA task vectors exact for DoRA.
    """
    directory = resolve_source(ref, kind="any")
    info: dict[str, Any] = {"ref": ref, "path": str(directory)}
    if (directory / "adapter_config.json").is_file():
        config = read_json_object(directory / "adapter_config.json", what="adapter config")
        peft_type = _peft_type(config)
        if peft_type == "OFT":
            return _describe_oft(info, ref, directory, config)
        if peft_type == "LORA":
            return _describe_lora(info, ref, directory, config, base)
        raise IncompatibleInputsError(f"unsupported adapter type {config.get('peft_type')!r}", path=directory)
    if (directory / "config.json").is_file():
        config = read_json_object(directory / "config.json", what="model config")
        reader = TensorReader.from_dir(directory, "model")
        info.update(
            type="full",
            model_type=config.get("model_type"),
            architectures=config.get("architectures"),
            **_summary_of_tensors(reader),
        )
        return info, reader
    raise InputError(
        "neither a PEFT adapter (adapter_config.json) nor a model checkpoint (config.json)", path=directory
    )


def _describe_oft(info: dict[str, Any], ref: str, directory, config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from .sources.oft import read_adapter_dir

    adapter = read_adapter_dir(ref, directory)
    mods = list(adapter.modules.values())
    info.update(
        type="oft",
        modules=len(mods),
        targets=_target_names([m.name for m in mods]),
        block_sizes=sorted({m.b for m in mods}),
        blocks_per_module=sorted({m.r for m in mods}),
        flags={
            "use_cayley_neumann": adapter.use_cayley_neumann,
            "num_cayley_neumann_terms": adapter.terms,
            "block_share": adapter.block_share,
            "coft": bool(config.get("coft", False)),
            "legacy_format": adapter.legacy,
            "bias": config.get("bias", "none"),
            "modules_to_save": config.get("modules_to_save"),
        },
        passthrough_tensors=len(adapter.passthrough),
        **_summary_of_tensors(adapter.tensors),
    )
    return info, adapter


def _describe_lora(
    info: dict[str, Any], ref: str, directory, config: dict[str, Any], base: TensorReader | None
) -> tuple[dict[str, Any], Any]:
    from .sources.lora import read_adapter_dir as read_lora_dir

    adapter = read_lora_dir(ref, directory)
    lora = LoraTasks(adapter, base)
    info.update(
        type="lora",
        modules=len(lora.modules),
        targets=_target_names(list(lora.modules)),
        ranks=sorted(set(lora.ranks.values())),
        flags={
            "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora", False)),
            "use_dora": bool(config.get("use_dora", False)),
            "fan_in_fan_out": lora.fan_in_fan_out,
            "rank_pattern": bool(config.get("rank_pattern")),
            "alpha_pattern": bool(config.get("alpha_pattern")),
            "bias": config.get("bias", "none"),
        },
        **_summary_of_tensors(adapter.source),
    )
    return info, lora


class LoraTasks:
    """LoRA task vectors per module, folded as PEFT does (`peft_orthomerge.sources.lora`).

    ``delta(name)`` is ``W_i - W0`` in torch layout ``(out, in)`` (``fan_in_fan_out`` weights are
    transposed; embeddings keep ``(num_embeddings, dim)``). With a base model the exact expert
    weight is used (DoRA included); without one, ``scaling * B @ A`` (DoRA needs the base).
    """

    def __init__(self, adapter: Any, base: TensorReader | None = None) -> None:
        from .ops.lora_fold import module_rank_alpha

        self.adapter, self.base = adapter, base
        self.modules = adapter.modules
        self.ranks = {name: module_rank_alpha(adapter.config, name)[0] for name in adapter.modules}
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))

    def delta(self, name: str) -> torch.Tensor:
        from .ops.lora_fold import lora_delta

        mod = self.modules[name]
        key = f"{name}.weight"
        if self.base is not None and key in self.base:
            w0 = self.base.get(key).double()
            delta = self.adapter.expert_weight(name, w0, fan_in_fan_out=self.fan_in_fan_out) - w0
        else:
            if self.adapter.use_dora:
                raise IncompatibleInputsError(
                    "DoRA task vectors depend on the base weights",
                    path=self.adapter.label,
                    tensor=name,
                    hint="Pass --base.",
                )
            src = self.adapter.source
            delta = lora_delta(
                src.get(mod.parts["A"]),
                src.get(mod.parts["B"]),
                self.adapter.scaling(name),
                fan_in_fan_out=self.fan_in_fan_out,
                embedding=mod.kind == "embedding",
                dtype=torch.float64,
            )
        return delta.T if self.fan_in_fan_out else delta


# -- relations ------------------------------------------------------------------------------------
def _rows(kind: str, handle: Any, name: str) -> torch.Tensor | None:
    """Task quantity of module ``name`` as a 2-D float64 tensor of rows, or ``None`` if absent."""
    if kind == "oft":
        if name not in handle.modules:
            return None
        from .ops.skew import vec_to_skew

        q = vec_to_skew(handle.canonical(name))  # (r, b, b)
        return q.reshape(-1, q.shape[-1])
    if kind == "lora":
        return handle.delta(name) if name in handle.modules else None
    raise AssertionError(kind)


def relate(kind: str, handles: list[Any], *, base: TensorReader | None = None) -> dict[str, Any]:
    """Per-module norms, pairwise cosine and conflicting-row shares for inputs of one ``kind``."""
    n = len(handles)
    gram = torch.zeros(n, n, dtype=torch.float64)
    conflicts = [0] * n
    rows_total = [0] * n
    norms: dict[str, list[float]] = {}
    if kind == "full":
        if base is None:
            raise InputError("comparing full checkpoints needs the base model: pass --base PATH_OR_ID")
        names = [k for k in base.keys() if len(base.shape(k)) == 2 and all(k in h for h in handles)]
    else:
        names = sorted(set().union(*(set(h.modules) for h in handles)))
    for name in progress(names, desc="inspect", unit="module"):
        if kind == "full":
            w0 = base.get(name).double()
            taus = [h.get(name).double() - w0 for h in handles]
            if any(t.shape != w0.shape for t in taus):
                raise IncompatibleInputsError(f"shape differs from the base {tuple(w0.shape)}", tensor=name)
        else:
            present = [_rows(kind, h, name) for h in handles]
            like = next(t for t in present if t is not None)
            taus = []
            for t, _h in zip(present, handles):
                if t is not None and t.shape != like.shape:
                    raise IncompatibleInputsError(
                        f"task shapes differ ({tuple(t.shape)} vs {tuple(like.shape)})", tensor=name
                    )
                taus.append(torch.zeros_like(like) if t is None else t)
        stack = torch.stack([t.reshape(t.shape[0], -1) for t in taus])  # (n, rows, cols)
        flat = stack.reshape(n, -1)
        gram += flat @ flat.T
        norms[name] = [float(v) for v in torch.linalg.vector_norm(flat, dim=1)]
        mean = stack.mean(dim=0)
        dots = (stack * mean).sum(dim=-1)  # (n, rows)
        active = (torch.linalg.vector_norm(stack, dim=-1) > 0) & (torch.linalg.vector_norm(mean, dim=-1) > 0)
        for i in range(n):
            conflicts[i] += int(((dots[i] < 0) & active[i]).sum())
            rows_total[i] += int(active[i].sum())
    diag = gram.diagonal().clamp_min(0).sqrt()
    denom = diag[:, None] * diag[None, :]
    cosine = torch.where(
        denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram)
    )
    return {
        "quantity": {
            "oft": "canonical skew generator Q",
            "lora": "task vector W_i - W0 (LoRA folded as PEFT does)",
            "full": "task vector W_i - W_base",
        }[kind],
        "modules_compared": len(names),
        "cosine": [[float(v) for v in row] for row in cosine],
        "total_norms": [float(v) for v in diag],
        "conflicting_row_share": [c / t if t else 0.0 for c, t in zip(conflicts, rows_total)],
        "module_norms": norms,
    }


def inspect_sources(refs: list[str], *, base: str | None = None) -> dict[str, Any]:
    """Describe every input; relate them when there are several of one type.

    When several inputs cannot be related (different types, OFT block layouts that differ, full
    checkpoints without ``base``), every input is still described and ``not_related`` says why
    (``hint``: what would make a comparison possible)."""
    base_reader = None
    if base is not None:
        base_reader = TensorReader.from_dir(resolve_source(base, kind="model"), "model")
    described = [describe_source(ref, base_reader) for ref in refs]
    result: dict[str, Any] = {"inputs": [info for info, _ in described]}
    if len(refs) < 2:
        if described[0][0]["type"] == "full" and base is None:
            result["hint"] = "to see this checkpoint's task vector, inspect it with a fine-tune and --base BASE"
        return result
    kinds = {info["type"] for info, _ in described}
    if len(kinds) != 1:
        result["not_related"] = (
            f"inputs are of different types ({', '.join(sorted(kinds))}); compare one type at a time"
        )
        return result
    kind = kinds.pop()
    if kind == "full" and base_reader is None:
        result["hint"] = "comparing full checkpoints needs the base model: pass --base PATH_OR_ID"
        return result
    try:
        result["relations"] = relate(kind, [h for _, h in described], base=base_reader)
    except IncompatibleInputsError as exc:
        result["not_related"] = _why_unrelated(kind, result["inputs"], exc)
    return result


def _why_unrelated(kind: str, infos: list[dict[str, Any]], exc: Exception) -> str:
    """Why inputs of one type cannot be compared: for OFT, their block layouts differ."""
    if kind == "oft":
        layouts = [
            f"[{i}] block sizes {d['block_sizes']}, blocks per module {d['blocks_per_module']}, "
            f"block_share={d['flags']['block_share']}"
            for i, d in enumerate(infos)
        ]
        return (
            f"the OFT adapters cannot be related ({exc}): their skew generators Q have different block "
            f"layouts ({'; '.join(layouts)}), so they live in different spaces"
        )
    return f"the inputs cannot be related: {exc}"


# -- text -----------------------------------------------------------------------------------------
def format_inspection(result: dict[str, Any]) -> str:
    """Human-readable text of `inspect_sources`' result."""
    lines: list[str] = []
    for i, info in enumerate(result["inputs"]):
        lines.append(f"[{i}] {info['ref']}: {info['type']}")
        if info["type"] == "full":
            lines.append(f"    model_type {info.get('model_type')}, architectures {info.get('architectures')}")
        else:
            lines.append(f"    modules {info['modules']}, targets {', '.join(info['targets'])}")
            if info["type"] == "oft":
                lines.append(f"    block sizes {info['block_sizes']}, blocks per module {info['blocks_per_module']}")
            else:
                lines.append(f"    ranks {info['ranks']}")
            lines.append("    flags " + ", ".join(f"{k}={v}" for k, v in info["flags"].items()))
        lines.append(
            f"    {info['tensors']} tensors, {info['parameters']:,} parameters, {human_bytes(info['bytes'])}, dtypes {', '.join(info['dtypes'])}"
        )
    if "hint" in result:
        lines.append(f"hint: {result['hint']}")
    rel = result.get("relations")
    if rel:
        n = len(result["inputs"])
        lines.append(f"relations over {rel['modules_compared']} modules ({rel['quantity']}):")
        lines.append("  pairwise cosine:")
        lines.append("        " + "".join(f"{f'[{j}]':>9}" for j in range(n)))
        for i, row in enumerate(rel["cosine"]):
            lines.append(f"    [{i}]" + "".join(f"{v:9.4f}" for v in row))
        lines.append(
            "  conflicting rows (cosine with the mean < 0): "
            + ", ".join(f"[{i}] {s:.1%}" for i, s in enumerate(rel["conflicting_row_share"]))
        )
        lines.append("  per-module norms (Frobenius norm of each input's task quantity):")
        lines.append(f"    {'module':<48} " + " ".join(f"{f'[{j}]':>10}" for j in range(n)))
        items = list(rel["module_norms"].items())
        shown = items if len(items) <= MAX_TEXT_ROWS else items[: MAX_TEXT_ROWS // 2] + items[-MAX_TEXT_ROWS // 2 :]
        for k, (name, values) in enumerate(shown):
            if len(items) > MAX_TEXT_ROWS and k == MAX_TEXT_ROWS // 2:
                lines.append(f"    ... {len(items) - MAX_TEXT_ROWS} more (use --json)")
            lines.append(f"    {name:<48} " + " ".join(f"{v:10.4g}" for v in values))
    return "\n".join(lines)
