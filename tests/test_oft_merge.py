"""End-to-end OFT merges (files and in memory) against the dense float64 reference of tests/_oft_utils.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _oft_utils import (
    folded_state,
    logits_with_state,
    make_oft_adapter,
    merged_reference,
    oft_modules,
    read_adapter,
    ref_canonical,
    ref_cayley,
    ref_fold,
    ref_peft_rotation,
    ref_skew,
    token_ids,
)
from conftest import build_tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_orthomerge import MergeReport, merge_oft_adapters, merge_oft_checkpoints
from peft_orthomerge.ops.registry import euclidean_methods, get_euclidean


@pytest.fixture(scope="module")
def oft(tmp_path_factory):
    root = tmp_path_factory.mktemp("oft")
    base = build_tiny_llama()
    base.save_pretrained(root / "base")
    dirs = {
        "A": make_oft_adapter(root / "A", seed=1, neumann=True),
        "B": make_oft_adapter(root / "B", seed=2, neumann=True, magnitude=0.03),
        "C": make_oft_adapter(root / "C", seed=3, neumann=False, targets=("q_proj", "v_proj", "up_proj")),
        "D": make_oft_adapter(root / "D", seed=4, neumann=False),
    }
    return root, base.state_dict(), dirs


def _reloaded_logits(adapter_dir, ids):
    model = PeftModel.from_pretrained(build_tiny_llama(), adapter_dir)
    with torch.no_grad():
        return model(ids).logits


def _rotations(ref):
    return {name: (kind, rot) for name, (kind, _, rot) in ref.items()}


CASES = {
    "neumann": (["A", "B"], None, "module", 1.0),
    "weights-block-scale": (["A", "B"], [3.0, 1.0], "block", 0.5),
    "exact": (["C", "D"], [1.0, 2.0], "module", 1.0),
    "mixed-union": (["A", "C", "D"], [1.0, 1.0, 2.0], "module", 1.3),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_export_matches_dense_reference(oft, tmp_path, case):
    root, base_state, dirs = oft
    names, weights, granularity, scale = CASES[case]
    inputs = [dirs[n] for n in names]
    report = merge_oft_checkpoints(inputs, tmp_path / "out", weights, granularity=granularity, scale=scale)
    ref = merged_reference(inputs, weights, granularity=granularity, scale=scale)
    config, state = read_adapter(tmp_path / "out")
    flags = {read_adapter(d)[0]["use_cayley_neumann"] for d in inputs}
    assert config["use_cayley_neumann"] == (flags == {True})
    assert config["coft"] is False and config["peft_type"] == "OFT"
    assert bool(report.warnings) == (len(flags) > 1)
    stored = oft_modules(state)
    assert set(stored) == set(ref)  # union of the targets
    for name, (kind, vec, _) in ref.items():
        torch.testing.assert_close(stored[name][1].double(), vec, rtol=1e-5, atol=1e-7)
    assert {m.name for m in report.modules} == set(ref)
    assert MergeReport.from_json(tmp_path / "out" / "orthomerge_report.json").weights == pytest.approx(report.weights)
    assert "orthomerge" in (tmp_path / "out" / "README.md").read_text()
    ids = token_ids()
    expected = logits_with_state(folded_state(base_state, _rotations(ref)), ids)
    torch.testing.assert_close(_reloaded_logits(tmp_path / "out", ids), expected, rtol=1e-4, atol=1e-5)


def test_folded_export_equals_reference_and_peft_merge(oft, tmp_path):
    root, base_state, dirs = oft
    inputs = [dirs["A"], dirs["C"], dirs["D"]]
    merge_oft_checkpoints(inputs, tmp_path / "adapter", [2, 1, 1])
    report = merge_oft_checkpoints(inputs, tmp_path / "folded", [2, 1, 1], fold_into=root / "base")
    assert (tmp_path / "folded" / "config.json").is_file() and report.output_path == str(tmp_path / "folded")
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    expected = folded_state(base_state, _rotations(merged_reference(inputs, [2, 1, 1])))
    merged_by_peft = (
        PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "adapter").merge_and_unload().state_dict()
    )
    assert set(folded) == set(base_state)
    for key, value in folded.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, merged_by_peft[key], rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_with_state(expected, ids), rtol=1e-4, atol=1e-5)


def test_in_memory_api_base_model_and_loaded_adapters(oft, tmp_path):
    root, base_state, dirs = oft
    ids = token_ids()
    ref = merged_reference([dirs["A"], dirs["C"]], [1, 3])
    expected = logits_with_state(folded_state(base_state, _rotations(ref)), ids)

    merged = merge_oft_adapters(build_tiny_llama(), [str(dirs["A"]), str(dirs["C"])], [1, 3])
    assert isinstance(merged, PeftModel) and merged.active_adapters == ["default"]
    assert merged.orthomerge_report.weights == pytest.approx([0.25, 0.75])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"  # the default adapter: no subfolder
    torch.testing.assert_close(_reloaded_logits(saved, ids), expected, rtol=1e-4, atol=1e-5)

    holder = PeftModel.from_pretrained(build_tiny_llama(), dirs["A"], adapter_name="a")
    holder.load_adapter(dirs["C"], adapter_name="c")
    result = merge_oft_adapters(holder, ["a", "c"], [1, 3], adapter_name="mix")
    assert result is holder and holder.active_adapters == ["mix"]
    with torch.no_grad():
        torch.testing.assert_close(holder(ids).logits, expected, rtol=1e-4, atol=1e-5)
    unloaded = holder.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_single_adapter_returns_its_rotation(oft, tmp_path):
    _, _, dirs = oft
    report = merge_oft_checkpoints([dirs["D"]], tmp_path / "out")
    _, state = read_adapter(tmp_path / "out")
    original = oft_modules(read_adapter(dirs["D"])[1])
    for name, (_, vec) in oft_modules(state).items():
        torch.testing.assert_close(vec, original[name][1], rtol=1e-6, atol=1e-8)
    assert all(m.magnitude_factor == pytest.approx(1.0) for m in report.modules)


def test_zero_sum_gives_identity(oft, tmp_path):
    root, base_state, dirs = oft
    flipped = tmp_path / "A_exact"
    shutil.copytree(dirs["A"], flipped)
    config = json.loads((flipped / "adapter_config.json").read_text())
    config["use_cayley_neumann"] = False  # same stored vectors, opposite convention: canonical -Q
    (flipped / "adapter_config.json").write_text(json.dumps(config))
    report = merge_oft_checkpoints([dirs["A"], flipped], tmp_path / "out")
    _, state = read_adapter(tmp_path / "out")
    assert all(torch.equal(v, torch.zeros_like(v)) for _, v in oft_modules(state).values())
    assert all(m.magnitude_factor is None and m.merged_norm == 0.0 for m in report.modules)
    ids = token_ids()
    torch.testing.assert_close(
        _reloaded_logits(tmp_path / "out", ids), logits_with_state(base_state, ids), rtol=0, atol=1e-6
    )


def test_mean_r_and_product_r_fold_against_dense(oft, tmp_path):
    root, base_state, dirs = oft
    inputs = [dirs["A"], dirs["D"]]
    merge_oft_checkpoints(inputs, tmp_path / "mean_r", [1, 3], method="mean_r", fold_into=root / "base")
    folded = load_file(tmp_path / "mean_r" / "model.safetensors")
    adapters = [read_adapter(d) for d in inputs]
    for name in oft_modules(adapters[0][1]):
        # mean_r averages the rotations the adapters really apply (Neumann series or exact Cayley)
        rots = [ref_peft_rotation(ref_skew(oft_modules(s)[name][1]), c["use_cayley_neumann"]) for c, s in adapters]
        expected = ref_fold(base_state[f"{name}.weight"], 0.25 * rots[0] + 0.75 * rots[1])
        torch.testing.assert_close(folded[f"{name}.weight"].double(), expected, rtol=1e-5, atol=1e-6)

    merge_oft_checkpoints(inputs, tmp_path / "product", method="product_r")
    config, state = read_adapter(tmp_path / "product")
    assert config["use_cayley_neumann"] is False  # mixed inputs
    for name, (_, vec) in oft_modules(state).items():
        rots = [ref_cayley(ref_canonical(oft_modules(s)[name][1], c["use_cayley_neumann"])) for c, s in adapters]
        got = ref_cayley(ref_canonical(vec, False))
        torch.testing.assert_close(got, rots[0] @ rots[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("ta" not in euclidean_methods(), reason="Euclidean methods not available")
def test_euclidean_baseline_on_folded_weights(oft, tmp_path):
    root, base_state, dirs = oft
    inputs = [dirs["A"], dirs["C"]]
    merge_oft_checkpoints(inputs, tmp_path / "ta", method="ta", fold_into=root / "base")
    folded = load_file(tmp_path / "ta" / "model.safetensors")
    adapters = [read_adapter(d) for d in inputs]
    for key, w0 in base_state.items():
        if not key.endswith("_proj.weight"):
            torch.testing.assert_close(folded[key], w0, rtol=0, atol=0)
            continue
        name = key[: -len(".weight")]
        taus = []
        for config, state in adapters:
            mods = oft_modules(state)
            if name not in mods:
                taus.append(torch.zeros_like(w0))
                continue
            rot = ref_peft_rotation(ref_skew(mods[name][1]), config["use_cayley_neumann"])
            taus.append((ref_fold(w0, rot) - w0.double()).float())
        expected = w0 + get_euclidean("ta")(taus, [0.5, 0.5], base=w0)
        torch.testing.assert_close(folded[key], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cayley,names", [("exact", ["A", "B"]), ("neumann", ["C", "D"])])
def test_forced_output_convention(oft, tmp_path, cayley, names):
    root, base_state, dirs = oft
    inputs = [dirs[n] for n in names]
    report = merge_oft_checkpoints(inputs, tmp_path / "out", cayley=cayley)
    config, state = read_adapter(tmp_path / "out")
    assert config["use_cayley_neumann"] == (cayley == "neumann") and not report.warnings
    ref = merged_reference(inputs, out_neumann=cayley == "neumann")
    for name, (_, vec, _) in ref.items():
        torch.testing.assert_close(oft_modules(state)[name][1].double(), vec, rtol=1e-5, atol=1e-7)
    ids = token_ids()
    expected = logits_with_state(folded_state(base_state, _rotations(ref)), ids)
    torch.testing.assert_close(_reloaded_logits(tmp_path / "out", ids), expected, rtol=1e-4, atol=1e-5)
