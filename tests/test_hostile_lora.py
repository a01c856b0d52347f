"""Hostile and broken inputs to the decoupling path (`merge_lora_adapters`, `merge_models`).

Every failure is a specific `OrthoMergeError` naming the file (and tensor where there is one),
nothing is written, inputs stay untouched, no NaN is produced. Edge cases that must succeed are
checked against independent dense computations (PEFT's own ``merge_and_unload`` for one adapter).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _hostile_utils import assert_names, assert_nothing_written, edit_config, pickle_only_copy, rewrite, tree_hash
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from peft_orthomerge import merge_lora_adapters, merge_models
from peft_orthomerge.errors import (
    ConfigError,
    IncompatibleInputsError,
    InputError,
    NumericalError,
    OrthoMergeError,
    OutputError,
    UnsafeInputError,
)
from peft_orthomerge.sinks import output as output_mod

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_lora(
    base_dir: Path,
    out: Path,
    *,
    seed: int,
    scale: float = 0.05,
    dtype: torch.dtype | None = None,
    targets=TARGETS,
    zero: bool = False,
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.zeros(param.shape) if zero else torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out)
    if dtype is not None:
        file = out / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(file).items()}, str(file))
    return out


def make_finetune(base_dir: Path, out: Path, *, seed: int, fn=None) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=gen))
            if fn is not None:
                fn(name, param)
    model.save_pretrained(out)
    return out


def base_model():
    return build_tiny_llama()  # the same weights as tiny_base_dir (seed 0)


def peft_fold(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload of one adapter (the independent reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("hostile_lora")
    small = root / "small_base"
    build_tiny_llama(seed=1, hidden_size=32, intermediate_size=96, num_attention_heads=2).save_pretrained(small)
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    oft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base_dir),
        OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"]),
    )
    oft.save_pretrained(root / "oft")
    return {
        "root": root,
        "base": tiny_base_dir,
        "small_base": small,
        "l1": make_lora(tiny_base_dir, root / "l1", seed=1),
        "l2": make_lora(tiny_base_dir, root / "l2", seed=2),
        "bf16": make_lora(tiny_base_dir, root / "bf16", seed=3, dtype=torch.bfloat16),
        "zero": make_lora(tiny_base_dir, root / "zero", seed=4, zero=True),
        "other_base": make_lora(small, root / "other_base", seed=5),
        "oft": root / "oft",
        "ft1": make_finetune(tiny_base_dir, root / "ft1", seed=11),
        "ft2": make_finetune(tiny_base_dir, root / "ft2", seed=12),
    }


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "merged"


# --------------------------------------------------------------------------------------------
# LoRA adapters: broken files and incompatible inputs
# --------------------------------------------------------------------------------------------
def test_oft_given_to_the_lora_path(lab):
    with pytest.raises(IncompatibleInputsError) as info:
        merge_lora_adapters(base_model(), [lab["l1"], lab["oft"]])
    assert_names(info.value, str(lab["oft"]), "merge_oft")


@pytest.mark.parametrize(
    "breakage",
    [
        "no-config",
        "no-weights",
        "invalid-json",
        "config-list",
        "peft-type-foo",
        "peft-type-null",
        "zero-byte-weights",
        "truncated-weights",
        "r-zero",
        "alpha-string",
    ],
)
def test_broken_lora_adapter_dirs(lab, tmp_path, breakage):
    bad = tmp_path / "bad"
    shutil.copytree(lab["l1"], bad)
    cfg_file, weights = bad / "adapter_config.json", bad / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    if breakage == "no-config":
        cfg_file.unlink()
    elif breakage == "no-weights":
        weights.unlink()
    elif breakage == "invalid-json":
        cfg_file.write_text("{oops")
    elif breakage == "config-list":
        cfg_file.write_text("[]")
    elif breakage == "peft-type-foo":
        cfg_file.write_text(json.dumps({**cfg, "peft_type": "FOO"}))
    elif breakage == "peft-type-null":
        cfg_file.write_text(json.dumps({**cfg, "peft_type": None}))
    elif breakage == "zero-byte-weights":
        weights.write_bytes(b"")
    elif breakage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-9])
    elif breakage == "r-zero":
        cfg_file.write_text(json.dumps({**cfg, "r": 0}))
    else:
        cfg_file.write_text(json.dumps({**cfg, "lora_alpha": "eight"}))
    with pytest.raises(InputError) as info:
        merge_lora_adapters(base_model(), [lab["l2"], bad])
    assert_names(info.value, str(bad))


def test_lora_target_missing_from_the_base(lab, tmp_path):
    def ghost(t):
        extra = {k.replace("mlp.down_proj", "mlp.ghost_proj"): v.clone() for k, v in t.items() if "mlp.down_proj" in k}
        return {**t, **extra}

    bad = rewrite(lab["l1"], tmp_path / "ghost", ghost)
    with pytest.raises(IncompatibleInputsError) as info:
        merge_lora_adapters(base_model(), [bad, lab["l2"]])
    assert_names(info.value, "ghost_proj")


def test_lora_for_a_different_base(lab):
    with pytest.raises(IncompatibleInputsError) as info:
        merge_lora_adapters(base_model(), [lab["l1"], lab["other_base"]])
    assert_names(info.value, str(lab["other_base"]))


def test_lora_with_only_half_of_a_module(lab, tmp_path):
    bad = rewrite(
        lab["l1"], tmp_path / "half", lambda t: {k: v for k, v in t.items() if not ("q_proj" in k and "lora_B" in k)}
    )
    with pytest.raises(IncompatibleInputsError) as info:
        merge_lora_adapters(base_model(), [bad])
    assert_names(info.value, "q_proj", "lora_B")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_weights(lab, tmp_path, value):
    def poison(t):
        key = sorted(k for k in t if "lora_A" in k)[0]
        v = t[key].clone()
        v[0, 0] = value
        return {**t, key: v}

    bad = rewrite(lab["l1"], tmp_path / "nan", poison)
    with pytest.raises(NumericalError) as info:
        merge_lora_adapters(base_model(), [lab["l2"], bad])
    assert_names(info.value, str(bad), "lora_A")


def test_pickle_only_lora_is_refused_and_never_runs(lab, tmp_path):
    marker = tmp_path / "PWNED"

    bad = pickle_only_copy(lab["l1"], tmp_path / "pickled", marker)
    with pytest.raises(UnsafeInputError) as info:
        merge_lora_adapters(base_model(), [bad])
    assert_names(info.value, "adapter_model.bin")
    assert not marker.exists()


def test_empty_list_and_bad_options(lab):
    model = base_model()
    for kwargs in (
        dict(adapters=[]),
        dict(adapters=[lab["l1"]], weights=[1.0, 2.0]),
        dict(adapters=[lab["l1"], lab["l2"]], weights=[1.0, -1.0]),
        dict(adapters=[lab["l1"], lab["l2"]], weights=[float("nan"), 1.0]),
        dict(adapters=[lab["l1"]], target="nope"),
        dict(adapters=[lab["l1"]], residual="nope"),
        dict(adapters=[lab["l1"]], solver="nope"),
        dict(adapters=[lab["l1"]], export="nope"),
        dict(adapters=[lab["l1"]], export="lora"),
        dict(adapters=[lab["l1"]], export="lora", rank=0),
        dict(adapters=[lab["l1"]], residual_kwargs={"no_such_option": 1}),
        dict(adapters=[lab["l1"]], residual_kwargs=[1, 2]),
    ):
        with pytest.raises(ConfigError):
            merge_lora_adapters(model, **kwargs)
    ref = build_tiny_llama().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # untouched


# --------------------------------------------------------------------------------------------
# LoRA adapters: numbers and edge cases that must succeed
# --------------------------------------------------------------------------------------------
def test_all_zero_adapters_leave_the_base_unchanged(lab):
    merged = merge_lora_adapters(base_model(), [lab["zero"], lab["zero"]], target="global").state_dict()
    ref = build_tiny_llama().state_dict()
    for key, value in merged.items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("target", ["global", "conflict", None])
def test_duplicates_return_the_single_adapter(lab, n, target):
    """N copies of one adapter (default TA, lambda = 1/N) give PEFT's own fold of that adapter."""
    merged = merge_lora_adapters(base_model(), [lab["l1"]] * n, target=target).state_dict()
    ref = peft_fold(lab["base"], lab["l1"])
    for key, value in merged.items():
        assert torch.allclose(value, ref[key], atol=2e-5, rtol=1e-4), key


def test_mixed_dtypes_bf16_and_fp32(lab):
    merged = merge_lora_adapters(base_model(), [lab["bf16"], lab["l2"]]).state_dict()
    base = build_tiny_llama().state_dict()
    assert all(v.dtype == base[k].dtype for k, v in merged.items())
    assert all(torch.isfinite(v).all() for v in merged.values())
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(any(t in k for t in TARGETS) for k in changed)


def test_exact_cancellation_in_the_euclidean_baseline(lab, tmp_path):
    neg = rewrite(lab["l1"], tmp_path / "neg", lambda t: {k: (-v if "lora_B" in k else v) for k, v in t.items()})
    merged = merge_lora_adapters(base_model(), [lab["l1"], neg], target=None).state_dict()
    ref = build_tiny_llama().state_dict()
    for key, value in merged.items():
        assert torch.allclose(value, ref[key], atol=1e-6), key


# --------------------------------------------------------------------------------------------
# full fine-tunes (merge_models): files, output, interrupts
# --------------------------------------------------------------------------------------------
def test_merge_models_identity_on_the_base(lab, tmp_path, out):
    """Fine-tunes equal to the base give the base back, bit for bit after the dtype round trip."""
    shutil.copytree(lab["base"], tmp_path / "same")
    merge_models(lab["base"], [tmp_path / "same", tmp_path / "same"], out)
    base = load_file(lab["base"] / "model.safetensors")
    got = {}
    for file in sorted(out.glob("model*.safetensors")):
        got.update(load_file(file))
    assert got.keys() == base.keys()
    for key, value in got.items():
        assert torch.allclose(value, base[key], atol=1e-6), key


@pytest.mark.parametrize("breakage", ["nan", "shape", "missing", "extra", "truncated", "no-weights", "pickle-only"])
def test_broken_finetunes(lab, tmp_path, out, breakage):
    bad = tmp_path / "bad"
    shutil.copytree(lab["ft1"], bad)
    file = bad / "model.safetensors"
    t = load_file(file)
    key = "model.layers.0.self_attn.q_proj.weight"
    expected: type[OrthoMergeError] = IncompatibleInputsError
    if breakage == "nan":
        t[key][1, 1] = float("nan")
        expected = NumericalError
    elif breakage == "shape":
        t[key] = t[key][:, :-1].contiguous()
    elif breakage == "missing":
        del t[key]
    elif breakage == "extra":
        t["model.layers.0.self_attn.ghost.weight"] = torch.ones(2, 2)
    if breakage in ("nan", "shape", "missing", "extra"):
        save_file(t, str(file))
    elif breakage == "truncated":
        file.write_bytes(file.read_bytes()[:-5])
        expected = InputError
    elif breakage == "no-weights":
        file.unlink()
        expected = InputError
    else:
        file.unlink()
        torch.save(t, bad / "pytorch_model.bin")
        expected = UnsafeInputError
    before = {k: tree_hash(lab[k]) for k in ("base", "ft2")}
    with pytest.raises(expected) as info:
        merge_models(lab["base"], [lab["ft2"], bad], out)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    if breakage in ("nan", "shape", "missing"):
        assert key in str(info.value)
    assert_nothing_written(out)
    assert {k: tree_hash(lab[k]) for k in ("base", "ft2")} == before


def test_pickle_finetune_opt_in_is_weights_only(lab, tmp_path, out):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "pickled"
    shutil.copytree(lab["ft1"], bad)
    tensors = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save({**tensors, "evil": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(UnsafeInputError):
        merge_models(lab["base"], [bad], out, allow_pickle=True)
    assert not marker.exists()
    assert_nothing_written(out)


def test_half_turn_is_reported_by_module(lab, tmp_path, out):
    """An expert whose weight is W0 @ (-I) needs P = -I: the inverse Cayley map is undefined
    there; a NumericalError names the tensor and nothing is written."""
    key = "model.layers.0.self_attn.q_proj.weight"

    def flip(name, param):
        if f"{name}" == key:
            param.copy_(-build_tiny_llama().state_dict()[key])

    bad = make_finetune(lab["base"], tmp_path / "flip", seed=13, fn=flip)
    with pytest.raises(NumericalError) as info:
        merge_models(lab["base"], [bad, lab["ft2"]], out, include=r"q_proj")
    assert_names(info.value, key)
    assert_nothing_written(out)


def test_output_checks(lab, tmp_path):
    before = tree_hash(lab["ft1"])
    for target in (lab["ft1"], lab["ft1"] / "sub", lab["base"]):
        with pytest.raises(OutputError):
            merge_models(lab["base"], [lab["ft1"], lab["ft2"]], target, overwrite=True)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("keep")
    with pytest.raises(OutputError):
        merge_models(lab["base"], [lab["ft1"], lab["ft2"]], existing)
    assert (existing / "keep").read_text() == "keep"
    assert tree_hash(lab["ft1"]) == before


@pytest.mark.parametrize("pattern", ["([", "*bad"])
def test_bad_include_regex(lab, out, pattern):
    with pytest.raises(ConfigError):
        merge_models(lab["base"], [lab["ft1"]], out, include=pattern)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "exc, expected",
    [(KeyboardInterrupt(), KeyboardInterrupt), (OSError(errno.ENOSPC, "No space left on device"), OutputError)],
)
def test_merge_models_interrupted_or_disk_full(lab, out, monkeypatch, exc, expected):
    before = {k: tree_hash(lab[k]) for k in ("base", "ft1", "ft2")}
    real_save = output_mod.save_file
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        real_save(tensors, filename, metadata=metadata)
        raise exc

    monkeypatch.setattr(output_mod, "save_file", failing)
    with pytest.raises(expected):
        merge_models(lab["base"], [lab["ft1"], lab["ft2"]], out)
    assert calls
    assert_nothing_written(out)
    assert {k: tree_hash(lab[k]) for k in ("base", "ft1", "ft2")} == before


# --------------------------------------------------------------------------------------------
# config values of the wrong type or range (as written by hand or by other tools)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch",
    [
        {"rank_pattern": {"q_proj": 0}},
        {"rank_pattern": {"q_proj": -4}},
        {"rank_pattern": {"q_proj": "x"}},
        {"rank_pattern": ["q_proj"]},
        {"rank_pattern": {"q_proj": 2}},  # disagrees with the stored rank 4
        {"alpha_pattern": {"q_proj": None}},
        {"alpha_pattern": {"q_proj": "x"}},
        {"alpha_pattern": "q_proj"},
        {"use_rslora": "yes"},
        {"fan_in_fan_out": True},  # Llama has nn.Linear, not Conv1D: shapes no longer fit
        {"target_modules": 5},
    ],
)
def test_lora_config_values_of_the_wrong_type(lab, tmp_path, patch):
    bad = edit_config(lab["l1"], tmp_path / "typed", lambda c: {**c, **patch})
    try:
        merged = merge_lora_adapters(base_model(), [bad, lab["l2"]])
    except OrthoMergeError as exc:
        assert_names(exc, str(bad))
    else:
        assert all(torch.isfinite(v).all() for v in merged.state_dict().values())
