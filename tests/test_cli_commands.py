"""``new``, ``merge --help``, ``inspect`` of sets that cannot be related, ``report``'s summary,
``demo --keep`` and the quiet library output of the CLI."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from _cli_utils import OFT_TARGETS, build_oft_inputs
from click.testing import CliRunner

from peft_orthomerge import cli
from peft_orthomerge.recipe import parse_recipe


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("commands_inputs")
    paths = build_oft_inputs(root, n=2)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(paths["base"]),
        OFTConfig(oft_block_size=8, r=0, target_modules=OFT_TARGETS, block_share=True, init_weights=False),
    )
    model.save_pretrained(root / "shared")
    paths["shared"] = root / "shared"
    return paths


@pytest.mark.parametrize("kind", ["oft", "lora", "full"])
def test_new_prints_a_valid_commented_template(tmp_path, kind):
    result = _run("new", kind)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.count("#") > 10 and f"kind: {kind}" in text
    recipe = parse_recipe(yaml.safe_load(text), base_dir=tmp_path)
    assert recipe.kind == kind and len(recipe.inputs) == 2
    # the written file loads with the recipe loader as well
    from peft_orthomerge.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "r.yaml") == recipe


def test_new_refuses_unknown_kind():
    result = _run("new", "qlora")
    assert result.exit_code == 2 and "qlora" in result.stderr


def test_merge_help_lists_kinds_methods_and_reference():
    from peft_orthomerge.ops.registry import method_names

    text = " ".join(_run("merge", "--help").stdout.split())
    assert "oft (OFT adapters)" in text and "lora (LoRA adapters)" in text and "full (full fine-tunes)" in text
    assert all(name in text for name in method_names())
    assert "Recipe reference" in text and "peft-orthomerge new" in text


def test_inspect_describes_inputs_it_cannot_relate(inputs):
    result = _run("inspect", inputs["oft0"], inputs["shared"])
    assert result.exit_code == 2
    assert result.stdout.count(": oft") == 2 and "block_share=True" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be related" in lines[0] and "block layouts" in lines[0], lines
    as_json = _run("inspect", inputs["oft0"], inputs["shared"], "--json")
    data = json.loads(as_json.stdout)
    assert len(data["inputs"]) == 2 and "block layouts" in data["not_related"]


def test_inspect_mixed_types_still_describes_each(inputs):
    result = _run("inspect", inputs["oft0"], inputs["base"])
    assert result.exit_code == 2 and "different types" in result.stderr
    assert "[0]" in result.stdout and "[1]" in result.stdout and "model_type llama" in result.stdout


def test_inspect_table_headers_and_full_hints(inputs, tmp_path):
    result = _run("inspect", inputs["oft0"], inputs["oft1"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["module"])
    assert "[0]" in header and "[1]" in header
    single = _run("inspect", inputs["base"])
    assert single.exit_code == 0 and "hint:" in single.stdout
    two = _run("inspect", inputs["base"], inputs["base"])
    assert two.exit_code == 0 and "--base" in two.stdout


def test_report_prints_a_summary_and_skipped_plots(inputs, tmp_path):
    from peft_orthomerge import merge_oft_checkpoints

    out = tmp_path / "merged"
    merge_oft_checkpoints([str(inputs["oft0"]), str(inputs["oft1"])], out)
    pytest.importorskip("matplotlib")
    result = _run("report", out)
    assert result.exit_code == 0, result.output
    assert "oft merge, orthomerge, 2 inputs" in result.stdout and "magnitude factor c" in result.stdout
    assert "plot skipped: decoupled_norms.png: not a decoupled merge" in result.stdout
    assert str(out / "diagnostics" / "report.json") in result.stdout
    quiet = _run("report", out, "--no-plots")
    assert quiet.exit_code == 0 and "--no-plots" in quiet.stdout and "plot skipped" not in quiet.stdout


def test_demo_keep_leaves_inputs_and_outputs(tmp_path):
    keep = tmp_path / "demo"
    result = _run("demo", "--keep", keep)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in keep.iterdir()) == ["base", "merged", "oft-task-a", "oft-task-b", "oft-task-c"]
    assert (keep / "merged" / "adapter_model.safetensors").is_file() and (keep / "base" / "config.json").is_file()
    again = _run("demo", "--keep", keep)
    assert again.exit_code == 2 and "new or empty" in again.stderr


def test_library_output_quiet_restores_state():
    from transformers.utils import logging as hf_logging

    from peft_orthomerge.progress import library_output_quiet

    verbosity = hf_logging.get_verbosity()
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        with library_output_quiet():
            assert hf_logging.get_verbosity() == logging.ERROR
            warnings.warn_explicit("from peft", UserWarning, "peft/tuners.py", 1, module="peft.tuners")
            warnings.warn_explicit("from torch", UserWarning, "torch/x.py", 1, module="torch.nn.x")
            warnings.warn_explicit("ours", UserWarning, "po.py", 1, module="peft_orthomerge.plan")
        assert hf_logging.get_verbosity() == verbosity and warnings.filters == filters
    assert [str(w.message) for w in caught] == ["ours"]
    with library_output_quiet(False):
        assert hf_logging.get_verbosity() == verbosity


class _Done:
    output_path = "done"

    def __str__(self) -> str:
        return "done"


def test_merge_silences_library_warnings_unless_verbose(tmp_path, inputs, monkeypatch):
    import peft_orthomerge.recipe as recipe_package

    def noisy(*args, **kwargs):
        warnings.warn_explicit(
            "a warning from transformers", FutureWarning, "transformers/m.py", 1, module="transformers.m"
        )
        return _Done()

    data = {"kind": "oft", "inputs": [{"path": str(inputs["oft0"])}], "output": {"path": "m"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(recipe_package, "run_recipe", noisy)
    for flags, expected in (((), 0), (("--verbose",), 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _run("merge", tmp_path / "r.yaml", *flags)
        assert result.exit_code == 0 and result.stdout.strip() == "done", result.output
        assert len([w for w in caught if "from transformers" in str(w.message)]) == expected


def test_paths_in_templates_are_placeholders():
    from peft_orthomerge.recipe.templates import recipe_template

    for kind in ("oft", "lora", "full"):
        data = yaml.safe_load(recipe_template(kind))
        assert not Path(data["output"]["path"]).is_absolute()
