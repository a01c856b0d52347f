"""Merged adapters load the way PEFT users load adapters, and a base mutated by PEFT is refused.

Checked against the independent dense reference of `_oft_utils` (explicit loops, `torch.block_diag`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _oft_utils import folded_state, logits_with_state, make_oft_adapter, merged_reference, token_ids
from conftest import build_tiny_llama
from peft import PeftModel

from peft_orthomerge import IncompatibleInputsError, merge_lora_adapters, merge_oft_adapters, merge_oft_checkpoints


def _expected_logits(dirs, weights, ids):
    ref = merged_reference(dirs, weights)
    rotations = {name: (kind, rot) for name, (kind, _, rot) in ref.items()}
    return logits_with_state(folded_state(build_tiny_llama().state_dict(), rotations), ids)


def test_quickstart_save_and_reload_as_the_readme_shows(tmp_path):
    dirs = [make_oft_adapter(tmp_path / f"a{i}", seed=40 + i, neumann=bool(i)) for i in range(2)]
    merged = merge_oft_adapters(build_tiny_llama(), [str(d) for d in dirs], weights=[2, 1])
    assert merged.active_adapter == "default"
    merged.save_pretrained(tmp_path / "merged-oft")
    assert (tmp_path / "merged-oft" / "adapter_config.json").is_file()  # not in a subfolder
    reloaded = PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "merged-oft").eval()
    ids = token_ids()
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, _expected_logits(dirs, [2, 1], ids), rtol=1e-4, atol=1e-5)


def test_a_model_holding_adapters_gets_a_named_adapter(tmp_path):
    dirs = [make_oft_adapter(tmp_path / f"a{i}", seed=50 + i) for i in range(2)]
    model = PeftModel.from_pretrained(build_tiny_llama(), dirs[0], adapter_name="first")
    merged = merge_oft_adapters(model, ["first", str(dirs[1])])
    assert merged is model and merged.active_adapter == "merged" and set(model.peft_config) == {"first", "merged"}


def test_auto_peft_model_loads_the_merged_adapter_from_any_directory(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    build_tiny_llama().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # the adapters name their base by a relative path, as after training
    dirs = []
    for i in range(2):
        d = make_oft_adapter(tmp_path / f"a{i}", seed=60 + i, task_type="CAUSAL_LM")
        config = json.loads((d / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "base"
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    merge_oft_checkpoints(dirs, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert written["task_type"] == "CAUSAL_LM"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = token_ids()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _expected_logits(dirs, None, ids), rtol=1e-4, atol=1e-5)
    assert os.getcwd() == str(elsewhere)


def test_a_base_reused_after_merge_oft_adapters_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    dirs = [make_oft_adapter(tmp_path / f"a{i}", seed=70 + i) for i in range(2)]
    lora = get_peft_model(build_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    base = build_tiny_llama()
    merge_oft_adapters(base, [str(d) for d in dirs])  # PEFT injects OFT layers into `base` itself
    with pytest.raises(IncompatibleInputsError, match="not a plain base"):
        merge_lora_adapters(base, [str(tmp_path / "lora")])
    with pytest.raises(IncompatibleInputsError, match="not a plain base"):
        merge_oft_adapters(base, [str(d) for d in dirs])


def test_the_report_notes_how_the_output_differs_in_form(tmp_path):
    from safetensors.torch import load_file, save_file

    dirs = [make_oft_adapter(tmp_path / f"a{i}", seed=80 + i) for i in range(2)]
    file = dirs[0] / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, str(file))
    report = merge_oft_checkpoints(dirs, tmp_path / "out")
    assert any("bfloat16" in n and "float32" in n for n in report.notes)
    assert "## Notes" in (tmp_path / "out" / "README.md").read_text()
    plain = merge_oft_checkpoints(dirs[1:], tmp_path / "plain")
    assert plain.notes == []


def test_a_recipe_records_its_base_model_in_the_merged_adapter(tmp_path):
    import yaml

    from peft_orthomerge.recipe import load_recipe, run_recipe

    build_tiny_llama().save_pretrained(tmp_path / "base")
    for i in range(2):
        make_oft_adapter(tmp_path / f"a{i}", seed=110 + i)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "kind": "oft",
                "base_model": "./base",
                "inputs": [{"path": "./a0"}, {"path": "./a1"}],
                "output": {"path": "./merged", "format": "adapter"},
            }
        )
    )
    run_recipe(load_recipe(recipe))
    written = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
