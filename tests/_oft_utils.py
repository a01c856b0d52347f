"""Test helpers for OFT: adapters made with PEFT itself, and an independent dense float64 reference.

The reference rebuilds every formula from DESIGN.md with explicit loops and dense matrices
(`torch.block_diag`), sharing no code with the library.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file

PREFIX = "base_model.model."


# -- adapters made by PEFT ---------------------------------------------------------------------
def make_oft_adapter(
    path: Path,
    *,
    seed: int,
    targets=("q_proj", "v_proj", "down_proj"),
    neumann: bool = True,
    magnitude: float = 0.02,
    model=None,
    perturb: float = 0.0,
    **config,
) -> Path:
    """Save an OFT adapter made by PEFT with random blocks of standard deviation ``magnitude``.

    ``perturb`` adds noise of that size to the trainable extras (``base_layer.bias`` with
    ``bias="oft_only"``, ``modules_to_save`` copies) so that they differ between adapters."""
    from peft import OFTConfig, get_peft_model

    model = build_tiny_llama() if model is None else model
    config.setdefault("oft_block_size", 16)
    config.setdefault("r", 0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, OFTConfig(target_modules=list(targets), init_weights=False, use_cayley_neumann=neumann, **config)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "oft_R" in name or "oft_embedding_R" in name:
                param.mul_(magnitude * 10)
            elif perturb and ("modules_to_save" in name or name.endswith("base_layer.bias")):
                param.add_(torch.randn_like(param) * perturb)
    peft_model.save_pretrained(path)
    return Path(path)


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    return json.loads((path / "adapter_config.json").read_text()), load_file(path / "adapter_model.safetensors")


def oft_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """module name -> (kind, stored tensor) for the OFT tensors of an adapter state dict."""
    out = {}
    for key, value in state.items():
        for suffix, kind in ((".oft_R.weight", "linear"), (".oft_embedding_R.weight", "embedding")):
            if key.endswith(suffix):
                out[key[len(PREFIX) : -len(suffix)]] = (kind, value)
    return out


# -- dense reference ---------------------------------------------------------------------------
def ref_block_size(n: int) -> int:
    b = 1
    while b * (b - 1) // 2 < n:
        b += 1
    assert b * (b - 1) // 2 == n
    return b


def ref_skew(vec: torch.Tensor) -> torch.Tensor:
    """(r, n) -> (r, b, b): explicit loops over the strict upper triangle, row by row; Q = U - U^T."""
    vec = vec.double()
    r, n = vec.shape
    b = ref_block_size(n)
    q = torch.zeros(r, b, b, dtype=torch.float64)
    for k in range(r):
        idx = 0
        for i in range(b):
            for j in range(i + 1, b):
                q[k, i, j] = vec[k, idx]
                q[k, j, i] = -vec[k, idx]
                idx += 1
    return q


def ref_vec(q: torch.Tensor) -> torch.Tensor:
    r, b, _ = q.shape
    return torch.stack([torch.stack([q[k, i, j] for i in range(b) for j in range(i + 1, b)]) for k in range(r)])


def ref_peft_rotation(q_stored: torch.Tensor, neumann: bool, terms: int = 5) -> torch.Tensor:
    """The rotation PEFT >= 0.18 builds from the *stored* skew blocks under its flag."""
    eye = torch.eye(q_stored.shape[-1], dtype=torch.float64)
    out = []
    for q in q_stored.double():
        if not neumann:
            out.append((eye - q) @ torch.linalg.inv(eye + q))
            continue
        if terms == 1:
            out.append(eye.clone())
        elif terms == 2:
            out.append(eye + 2 * q)
        else:
            m = max(2, terms - 2)
            total = eye + sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, m + 1))
            out.append(total + torch.linalg.matrix_power(q, m + 1))
    return torch.stack(out)


def ref_cayley(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 per block."""
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return torch.stack([(eye + x) @ torch.linalg.inv(eye - x) for x in q.double()])


def ref_canonical(stored: torch.Tensor, neumann: bool) -> torch.Tensor:
    """Stored vector -> skew blocks Q with R ~ (I+Q)(I-Q)^-1 (the exact flag stores -Q)."""
    q = ref_skew(stored)
    return q if neumann else -q


def ref_orthomerge(qs: list[torch.Tensor], weights: list[float], granularity: str = "module") -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    s = sum(wi * q for wi, q in zip(w, qs))
    if granularity == "module":
        target = sum(wi * torch.sqrt((q**2).sum()) for wi, q in zip(w, qs))
        norm = torch.sqrt((s**2).sum())
        return torch.zeros_like(s) if norm == 0 else s * (target / norm)
    out = torch.zeros_like(s)
    for k in range(s.shape[0]):
        target = sum(wi * torch.sqrt((q[k] ** 2).sum()) for wi, q in zip(w, qs))
        norm = torch.sqrt((s[k] ** 2).sum())
        if norm > 0:
            out[k] = s[k] * (target / norm)
    return out


def ref_fold(weight: torch.Tensor, rotation: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """Dense fold: Linear/Conv ``W @ D^T``, embedding ``E @ D``, with D = block_diag(R_k) (repeated if shared)."""
    w2 = weight.double().reshape(weight.shape[0], -1)
    b = rotation.shape[-1]
    blocks = list(rotation.double())
    if len(blocks) == 1:
        blocks = blocks * (w2.shape[1] // b)
    dense = torch.block_diag(*blocks)
    out = w2 @ (dense if kind == "embedding" else dense.T)
    return out.reshape(weight.shape)


def merged_reference(adapter_dirs, weights=None, *, out_neumann=None, granularity="module", scale=1.0):
    """Dense reference of an OrthoMerge: module -> (kind, stored output vector, PEFT rotation of it)."""
    adapters = [read_adapter(d) for d in adapter_dirs]
    weights = [1.0] * len(adapters) if weights is None else weights
    flags = [cfg["use_cayley_neumann"] for cfg, _ in adapters]
    if out_neumann is None:
        out_neumann = flags[0] if len(set(flags)) == 1 else False
    terms = max([cfg["num_cayley_neumann_terms"] for cfg, _ in adapters if cfg["use_cayley_neumann"]] or [5])
    names = {}
    for _, state in adapters:
        names.update(oft_modules(state))
    result = {}
    for name, (kind, example) in names.items():
        qs = []
        for cfg, state in adapters:
            mods = oft_modules(state)
            if name in mods:
                qs.append(ref_canonical(mods[name][1], cfg["use_cayley_neumann"]))
            else:
                qs.append(torch.zeros_like(ref_skew(example)))
        rows = max(q.shape[0] for q in qs)  # a shared block (block_share) acts on every block
        qs = [q.expand(rows, -1, -1).clone() for q in qs]
        q = ref_orthomerge(qs, weights, granularity) * scale
        stored = q if out_neumann else -q
        result[name] = (kind, ref_vec(stored), ref_peft_rotation(stored, out_neumann, terms))
    return result


def folded_state(
    base_state: dict[str, torch.Tensor], rotations: dict[str, tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Base state dict with ``{module: (kind, R)}`` folded in densely (float64 math, float32 result)."""
    out = dict(base_state)
    for name, (kind, rot) in rotations.items():
        key = f"{name}.weight"
        out[key] = ref_fold(base_state[key], rot, kind).to(base_state[key].dtype)
    return out


def logits_with_state(state: dict[str, torch.Tensor], ids: torch.Tensor, **overrides) -> torch.Tensor:
    model = build_tiny_llama(**overrides)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids).logits


def token_ids(seed: int = 1, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=g)
