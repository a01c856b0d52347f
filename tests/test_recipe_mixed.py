"""``kind: mixed`` recipes: full checkpoints, LoRA and OFT adapters of one base in one merge.

The merge must equal `merge_models` on the same inputs (checked against PEFT's fold and the dense
reference in test_merge_models_mixed.py and test_mixed_oft.py); the dry run accepts full checkpoints,
LoRA and OFT adapters, and lists each with its kind and path.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from _lora_utils import make_lora_adapter, perturbed_state, single_thread  # noqa: F401  (autouse fixture)
from _oft_utils import make_oft_adapter
from click.testing import CliRunner
from conftest import build_tiny_llama
from safetensors.torch import load_file

from peft_orthomerge import merge_models
from peft_orthomerge.cli import main
from peft_orthomerge.recipe import load_recipe, run_recipe
from peft_orthomerge.recipe.templates import recipe_template


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_recipe")
    build_tiny_llama().save_pretrained(root / "base")
    full = build_tiny_llama()
    full.load_state_dict(perturbed_state(build_tiny_llama(), seed=41))
    full.save_pretrained(root / "ft")
    make_lora_adapter(build_tiny_llama, root / "lora", seed=42, target_modules=["q_proj", "down_proj"])
    make_oft_adapter(root / "oft", seed=43)
    return root


def _recipe(root, inputs, out="merged"):
    path = root / "mixed.yaml"
    data = {
        "kind": "mixed",
        "base_model": "./base",
        "inputs": [{"path": f"./{name}"} for name in inputs],
        "method": {"name": "orthomerge", "target": "conflict", "residual": "ties"},
        "output": {"path": f"./{out}", "format": "model"},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_mixed_recipe_runs_merge_models_on_checkpoints_and_lora_adapters(inputs, tmp_path):
    report = run_recipe(load_recipe(_recipe(inputs, ["ft", "lora"])), out=tmp_path / "recipe")
    merge_models(
        inputs / "base", [inputs / "ft", inputs / "lora"], tmp_path / "api", target="conflict", residual="ties"
    )
    got, want = load_file(tmp_path / "recipe" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert report.kind == "full" and (tmp_path / "recipe" / "orthomerge_recipe.yaml").is_file()


def test_the_dry_run_accepts_all_three_kinds_and_lists_each_with_its_path(inputs):
    ok = CliRunner().invoke(main, ["merge", str(_recipe(inputs, ["ft", "lora", "oft"])), "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "LoRA adapter" in ok.output and "full checkpoint" in ok.output
    line = next(x for x in ok.output.splitlines() if x.strip().startswith("[2]"))
    assert "OFT adapter" in line and str((inputs / "oft").resolve()) in line
    assert "dense" in ok.output  # the weights the OFT adapter rotates take the dense driver


def test_a_mixed_recipe_with_an_oft_adapter_runs_merge_models(inputs, tmp_path):
    run_recipe(load_recipe(_recipe(inputs, ["ft", "oft"])), out=tmp_path / "recipe")
    merge_models(
        inputs / "base", [inputs / "ft", inputs / "oft"], tmp_path / "api", target="conflict", residual="ties"
    )
    got, want = load_file(tmp_path / "recipe" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_lora_adapter_given_to_kind_full_points_to_mixed(inputs):
    path = _recipe(inputs, ["ft", "lora"])
    path.write_text(path.read_text().replace("kind: mixed", "kind: full"))
    result = CliRunner().invoke(main, ["merge", str(path), "--dry-run"])
    assert result.exit_code == 2 and "kind: mixed" in result.output


def test_the_mixed_template_parses(tmp_path):
    (tmp_path / "t.yaml").write_text(recipe_template("mixed"))
    assert load_recipe(tmp_path / "t.yaml").kind == "mixed"
