"""`conv1d_weight_names`: which checkpoint tensors are GPT-2 `Conv1D` weights stored (in, out)."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from conftest import build_tiny_llama
from safetensors import safe_open

from peft_orthomerge.sources.layout import conv1d_weight_names

NOT_CHECKED = "could not check the weight layout"


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kwargs = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 32}
    kwargs |= {"bos_token_id": 0, "eos_token_id": 0}  # inside the tiny vocabulary
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def checkpoint_names(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = f.keys()
        return {k: tuple(f.get_slice(k).get_shape()) for k in names}


def call_quietly(model_dir, names) -> set[str]:
    """Call with every warning turned into an error: a supported case must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return conv1d_weight_names(model_dir, names)


@pytest.fixture(scope="module", params=["lm_head_model", "base_model"])
def gpt2_dir(request, tmp_path_factory):
    """A tiny GPT-2 saved from GPT2LMHeadModel or from GPT2Model, plus the real model."""
    from transformers import GPT2LMHeadModel, GPT2Model

    cls = GPT2LMHeadModel if request.param == "lm_head_model" else GPT2Model
    torch.manual_seed(0)
    model = cls(tiny_gpt2_config()).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def test_gpt2_returns_exactly_the_conv1d_weights(gpt2_dir):
    from transformers.pytorch_utils import Conv1D

    path, model = gpt2_dir
    names = checkpoint_names(path)
    shapes = checkpoint_shapes(path)
    # independent of the implementation: walk the real, instantiated model
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert set(modules) <= set(names)  # the checkpoint stores them under the model's own names
    expected = set(modules)
    assert len(expected) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert {n.split(".")[-2] for n in expected} == {"c_attn", "c_proj", "c_fc"}

    got = call_quietly(path, names)
    assert got == expected
    for name in got:
        assert shapes[name] == (modules[name].nx, modules[name].nf)  # (in, out)
    for name in names:
        if any(part in name for part in ("wte", "wpe", "ln_", "lm_head")) or name.endswith(".bias"):
            assert name not in got


def test_conv1d_really_is_in_out(gpt2_dir):
    """The convention the detection serves: a Conv1D weight W (in, out) computes x @ W + b."""
    from transformers.pytorch_utils import Conv1D

    _, model = gpt2_dir
    convs = [copy.deepcopy(m).double() for m in model.modules() if isinstance(m, Conv1D)]
    assert convs
    for conv in convs:
        w, b = conv.weight.detach(), conv.bias.detach()
        assert tuple(w.shape) == (conv.nx, conv.nf)
        x = torch.randn(3, conv.nx, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), x @ w + b)


def test_gpt2_prefix_either_way(tmp_path):
    """Config of a GPT2LMHeadModel but keys of a GPT2Model (and vice versa) still match."""
    tiny_gpt2_config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    bare = ["h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight", "h.0.attn.c_attn.bias", "wte.weight"]
    prefixed = ["transformer." + n for n in bare]
    assert call_quietly(tmp_path, bare) == {"h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight"}
    assert call_quietly(tmp_path, iter(prefixed)) == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight",
    }


def test_only_given_names_are_returned(tmp_path):
    tiny_gpt2_config().save_pretrained(tmp_path)
    assert call_quietly(tmp_path, []) == set()
    assert call_quietly(tmp_path, ["h.5.attn.c_attn.weight", "h.0.attn.c_attn"]) == set()  # no layer 5; no suffix


def test_llama_has_no_conv1d(tmp_path):
    build_tiny_llama().save_pretrained(tmp_path)
    names = checkpoint_names(tmp_path)
    assert any(n.endswith("q_proj.weight") for n in names)
    assert call_quietly(tmp_path, names) == set()


def test_built_on_meta_without_allocating(tmp_path):
    """A GPT-2 whose c_fc alone would need 2**42 floats: only a meta build can describe it."""
    huge = 2**20
    tiny_gpt2_config(n_embd=huge, n_layer=1, n_head=2, vocab_size=8, n_positions=4).save_pretrained(tmp_path)
    names = ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "wte.weight"]
    assert call_quietly(tmp_path, names) == {"h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"}


def write_config(path, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))


def assert_warns_not_checked(model_dir, names) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert conv1d_weight_names(model_dir, names) == set()
    messages = [str(w.message) for w in caught if NOT_CHECKED in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "(out, in)" in messages[0] and "config.json" in messages[0]


def test_unknown_model_type_warns(tmp_path):
    write_config(tmp_path, {"model_type": "no_such_architecture_xyz", "n_embd": 32})
    assert_warns_not_checked(tmp_path, ["h.0.attn.c_attn.weight"])


def test_missing_model_type_warns(tmp_path):
    write_config(tmp_path, {"hidden_size": 32})
    assert_warns_not_checked(tmp_path, ["h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_invalid_config_warns(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    assert_warns_not_checked(tmp_path, ["h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("model_type", ["gpt2", "evil_remote_arch"])
def test_auto_map_is_refused_without_importing(tmp_path, model_type):
    """Remote code is never run, even when the model_type also exists locally."""
    sentinel = tmp_path / "imported.txt"
    code = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    for module in ("configuration_evil", "modeling_evil"):
        (tmp_path / f"{module}.py").write_text(code)
    config = tiny_gpt2_config().to_dict()
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    write_config(tmp_path, config)
    assert_warns_not_checked(tmp_path, ["h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"])
    assert not sentinel.exists()
    assert not any("evil" in name for name in sys.modules)


def test_missing_config_is_silent(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert call_quietly(tmp_path, ["h.0.attn.c_attn.weight"]) == set()
    assert call_quietly(tmp_path / "does_not_exist", ["h.0.attn.c_attn.weight"]) == set()
