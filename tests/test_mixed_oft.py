"""`merge_models` with OFT adapters among the experts: each with its own exact rotation, never a Procrustes fit.

The reference below is dense, float64, plain torch and shares no code with the library. Per 2-D
weight ``W0`` (``(out, in)``, decoupling ``W_i ~ W0 @ P_i``):

- an OFT expert: ``P_i = blockdiag(R_k)^T`` with ``R_k = (I + Q_k)(I - Q_k)^-1`` (by
  ``torch.linalg.solve``) of its canonical blocks (the stored ones, negated for
  ``use_cayley_neumann=False``), ``rho_i`` = PEFT's own ``merge_and_unload`` weight ``- W0 @ P_i``;
  a weight it does not target: ``P_i = I``, ``rho_i = 0``;
- a LoRA or full expert: the closest-to-identity Procrustes rotation (`test_decouple_ops.ref_rotation`,
  full SVD), with the global or conflict target (whose mean task vector counts every expert);
- ``Q_i = (P_i - I)(P_i + I)^-1``, merged with magnitude correction over the whole weight,
  ``P = cayley(Q)``, residuals by TA or TIES, result ``W0 @ P + rho``.

The tiny Llama has GQA, so ``k_proj`` / ``v_proj`` (``16 x 64``) and ``down_proj`` (``64 x 160``)
have ``out < in``.
"""

from __future__ import annotations

import json

import pytest
import torch
from _lora_utils import make_lora_adapter, perturbed_state, single_thread  # noqa: F401  (autouse fixture)
from _oft_utils import make_oft_adapter, oft_modules, read_adapter, ref_skew
from conftest import build_tiny_llama
from safetensors.torch import load_file
from test_decouple_ops import ref_merge, ref_rotation

from peft_orthomerge import IncompatibleInputsError, merge_models, merge_oft_checkpoints
from peft_orthomerge.plan.checkpoint import plan_checkpoint
from peft_orthomerge.plan.options import DecoupleOptions
from peft_orthomerge.sources.checkpoint import input_kind, open_checkpoint, open_expert, rotated_tensors

F64 = torch.float64
ORDER = ["full", "lora", "oft_exact", "oft_neumann"]
WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def _base64():
    return build_tiny_llama().double()


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """Base, a full fine-tune, a LoRA adapter and two OFT adapters (exact Cayley, Neumann), all float64,
    and the checkpoint PEFT's ``merge_and_unload`` makes of each adapter."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("mixed_oft")
    _base64().save_pretrained(root / "base")
    full = _base64()
    full.load_state_dict(perturbed_state(_base64(), seed=61))
    full.save_pretrained(root / "full")
    make_lora_adapter(_base64, root / "lora", seed=62, r=4, target_modules=["q_proj", "k_proj", "down_proj"])
    make_oft_adapter(
        root / "oft_exact",
        seed=63,
        neumann=False,
        magnitude=0.05,
        model=_base64(),
        targets=("q_proj", "v_proj", "down_proj"),
    )
    make_oft_adapter(
        root / "oft_neumann", seed=64, magnitude=0.05, model=_base64(), oft_block_size=32,
        targets=("k_proj", "q_proj", "down_proj", "embed_tokens"),
    )  # fmt: skip
    for name in ("lora", "oft_exact", "oft_neumann"):
        PeftModel.from_pretrained(_base64(), root / name).merge_and_unload().save_pretrained(root / f"{name}_folded")
    return root


# -- independent reference -------------------------------------------------------------------------


def ref_cayley(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 by a solve: X (I - Q) = I + Q."""
    eye = torch.eye(q.shape[-1], dtype=F64)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def ref_generator(p: torch.Tensor) -> torch.Tensor:
    """(P - I)(P + I)^-1 by a solve."""
    eye = torch.eye(p.shape[-1], dtype=F64)
    return torch.linalg.solve(p + eye, p - eye, left=False)


def ref_oft_rotation(root, name: str, key: str, n: int) -> torch.Tensor:
    """P = blockdiag(R_k)^T of adapter ``name`` for weight ``key`` (``in = n``; an embedding, rotated
    as ``E @ blockdiag(R)``: ``P = blockdiag(R_k)``); I where not targeted."""
    config, state = read_adapter(root / name)
    mods = oft_modules(state)
    module = key.removesuffix(".weight")
    if module not in mods:
        return torch.eye(n, dtype=F64)
    kind, stored = mods[module]
    q = ref_skew(stored)
    if not config["use_cayley_neumann"]:
        q = -q
    p = torch.block_diag(*[ref_cayley(block) for block in q])
    return p if kind == "embedding" else p.T


def ref_ties(taus: list[torch.Tensor], weights: list[float], density: float = 0.2) -> torch.Tensor:
    """TIES per tensor: top-k trim, weighted sign election (ties to +), disjoint mean of the weighted entries."""
    n = len(taus)
    trimmed = []
    for w, t in zip(weights, taus):
        k = max(1, int(density * t.numel()))
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().topk(k).indices] = True
        trimmed.append(n * w * torch.where(keep.view(t.shape), t, torch.zeros_like(t)))
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0).to(F64)
    agree = [(t.sign() == sign).to(F64) for t in trimmed]
    return sum(t * a for t, a in zip(trimmed, agree)) / sum(agree).clamp(min=1.0)


def ref_euclidean(vectors: list[torch.Tensor], weights: list[float], residual: str) -> torch.Tensor:
    if residual == "ta":  # lam = 1/N on the relative weights N w_i: sum_i w_i v_i
        return sum(w * v for w, v in zip(weights, vectors))
    return ref_ties(vectors, weights)


def ref_mixed(root, names: list[str], weights: list[float], target: str, residual: str) -> dict[str, torch.Tensor]:
    """The merged checkpoint, every tensor (module docstring)."""
    base = load_file(root / "base" / "model.safetensors")
    experts = [load_file(root / (n if n == "full" else f"{n}_folded") / "model.safetensors") for n in names]
    out = {}
    for key, w0 in base.items():
        weights_i = [e[key] for e in experts]
        taus = [w - w0 for w in weights_i]
        if w0.dim() != 2:
            out[key] = w0 + ref_euclidean(taus, weights, residual)
            continue
        mean = sum(w * t for w, t in zip(weights, taus))
        eye = torch.eye(w0.shape[1], dtype=F64)
        qs, rhos = [], []
        for name, e, t in zip(names, weights_i, taus):
            if name.startswith("oft"):
                p = ref_oft_rotation(root, name, key, w0.shape[1])
            else:
                rows = torch.tensor([1.0 if float(t[r] @ mean[r]) < 0 else 0.0 for r in range(t.shape[0])], dtype=F64)
                tgt = e if target == "global" else w0 + t * rows[:, None]
                p = eye.clone() if torch.equal(tgt, w0) else ref_rotation(w0, tgt)
            qs.append(ref_generator(p))
            rho = e - w0 @ p
            rho[rho.abs() < 1e-13] = 0.0  # zero in exact arithmetic (an exact-Cayley OFT): TIES counts any non-zero
            rhos.append(rho)
        s = sum(w * q for w, q in zip(weights, qs))
        total = sum(w * float(torch.linalg.matrix_norm(q)) for w, q in zip(weights, qs))
        snorm = float(torch.linalg.matrix_norm(s))
        q = s * (total / snorm) if snorm > 1e-12 * total else torch.zeros_like(s)
        out[key] = w0 @ ref_cayley(q) + ref_euclidean(rhos, weights, residual)
    return out


def _assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=key)  # measured <= 5e-16


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["ta", "ties"])
@pytest.mark.parametrize("target", ["global", "conflict"])
def test_an_oft_lora_and_full_mix_matches_the_dense_reference(mix, tmp_path, target, residual):
    refs = [mix / n for n in ORDER]
    merge_models(mix / "base", refs, tmp_path / "out", WEIGHTS, target=target, residual=residual)
    got = load_file(tmp_path / "out" / "model.safetensors")
    _assert_matches(got, ref_mixed(mix, ORDER, WEIGHTS, target, residual))


def test_an_oft_only_mixed_merge_is_the_dense_so_in_merge(mix, tmp_path):
    names, weights = ["oft_exact", "oft_neumann"], [0.7, 0.3]
    merge_models(mix / "base", [mix / n for n in names], tmp_path / "out", weights, residual="ties")
    got = load_file(tmp_path / "out" / "model.safetensors")
    _assert_matches(got, ref_mixed(mix, names, weights, "global", "ties"))


def test_exact_cayley_oft_inputs_alone_give_the_adapter_space_merge_folded(mix, tmp_path):
    """Same block size, exact Cayley, TA: the so(in) merge of block-diagonal generators is the
    adapter-space merge (module granularity) folded with the exact Cayley map; no residual is left."""
    second = make_oft_adapter(
        tmp_path / "oft_b", seed=65, neumann=False, magnitude=0.05, model=_base64(), targets=("q_proj", "o_proj")
    )
    refs, weights = [mix / "oft_exact", second], [0.6, 0.4]
    merge_models(mix / "base", refs, tmp_path / "mixed", weights)
    merge_oft_checkpoints(refs, tmp_path / "folded", weights, cayley="exact", fold_into=mix / "base")
    got, want = (
        load_file(tmp_path / "mixed" / "model.safetensors"),
        load_file(tmp_path / "folded" / "model.safetensors"),
    )
    _assert_matches(got, want)


@pytest.mark.parametrize("target", ["global", "conflict"])
@pytest.mark.parametrize("name", ["oft_exact", "oft_neumann"])
def test_an_oft_expert_alone_is_peft_merge_and_unload(mix, tmp_path, name, target):
    """Exact Cayley: ``W0 @ P`` is PEFT's weight and the residual is zero. Neumann: the residual
    (PEFT's weight minus ``W0 @ P``) is kept whole by task arithmetic of one expert."""
    merge_models(mix / "base", [mix / name], tmp_path / "out", target=target)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(mix / f"{name}_folded" / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("target", ["global", "conflict"])
def test_a_weight_an_oft_expert_does_not_target_is_identity_for_it(mix, tmp_path, target):
    """o_proj: not targeted by the OFT adapter, so it is W0 there (P = I, rho = 0) and keeps its driver."""
    weights = [0.6, 0.4]
    report = merge_models(mix / "base", [mix / "full", mix / "oft_exact"], tmp_path / "out", weights, target=target)
    got = load_file(tmp_path / "out" / "model.safetensors")
    base, full = load_file(mix / "base" / "model.safetensors"), load_file(mix / "full" / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(
        got[key], ref_merge(base[key], [full[key], base[key]], weights, target), rtol=0, atol=1e-9
    )
    entry = next(m for m in report.modules if m.name == key)
    assert entry.input_norms[1] == 0.0 and entry.extra["residual_norm_1"] == 0.0


def test_weights_an_oft_expert_rotates_take_the_dense_driver(mix):
    base_dir, base = open_checkpoint(mix / "base", False)
    experts = [open_expert(mix / n, base, base_dir, False)[1] for n in ("full", "oft_neumann")]
    tasks = plan_checkpoint(base, base_dir, DecoupleOptions(), rotated=rotated_tensors(experts))
    paths = {t.name: t.path for t in tasks}
    assert paths["model.layers.1.self_attn.k_proj.weight"] == "dense"  # rotated; else "reduced"
    assert paths["model.layers.1.mlp.down_proj.weight"] == "dense"
    assert paths["model.layers.1.self_attn.v_proj.weight"] == "reduced"  # not rotated
    assert paths["model.layers.1.self_attn.o_proj.weight"] == "rows"


def test_input_kind_tells_the_three_kinds_apart(mix):
    assert [input_kind(mix / n) for n in ORDER] == ["full", "lora", "oft", "oft"]


def test_another_adapter_type_is_refused_naming_it(mix, tmp_path):
    other = tmp_path / "boft"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT"}))
    with pytest.raises(IncompatibleInputsError, match="BOFT adapter.*LoRA and OFT adapters"):
        merge_models(mix / "base", [mix / "full", other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_oft_adapter_of_another_base_is_refused(mix, tmp_path):
    wide = make_oft_adapter(tmp_path / "wide", seed=66, model=build_tiny_llama(hidden_size=96), targets=("q_proj",))
    with pytest.raises(IncompatibleInputsError, match="do not fit the base weight"):
        merge_models(mix / "base", [wide], tmp_path / "out")
