"""``merge --dry-run``: kinds, shapes and the base checked before any work; the printed plan."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from _cli_utils import build_lora_and_full_inputs, build_oft_inputs
from click.testing import CliRunner

from peft_orthomerge import cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry_run_inputs")
    paths = build_oft_inputs(root, n=2)
    paths.update(build_lora_and_full_inputs(root, paths["base"]))
    return paths


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _write(root: Path, kind: str, inputs: list[Path], base: Path | None, **extra) -> Path:
    data = {"kind": kind, "inputs": [{"path": str(p)} for p in inputs], "output": {"path": "merged"}, **extra}
    if base is not None:
        data["base_model"] = str(base)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_lora_folder_given_to_kind_full_fails_in_dry_run(tmp_path, inputs):
    recipe = _write(tmp_path, "full", [inputs["ft0"], inputs["lora0"]], inputs["base"])
    before = _tree(tmp_path)
    result = _run("merge", recipe, "--dry-run")
    _one_line_error(result, f"input {inputs['lora0']} is a LoRA adapter", "use kind: lora")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("kind", "name", "said"),
    [
        ("oft", "lora0", "is a LoRA adapter, but the recipe has kind: oft; use kind: lora"),
        ("lora", "ft0", "is a full checkpoint, but the recipe has kind: lora; use kind: full"),
        ("lora", "oft0", "is an OFT adapter, but the recipe has kind: lora; use kind: oft"),
        ("full", "oft0", "is an OFT adapter, but the recipe has kind: full; use kind: oft"),
    ],
)
def test_inputs_of_another_kind_are_named(tmp_path, inputs, kind, name, said):
    recipe = _write(tmp_path, kind, [inputs[name]], inputs["base"])
    _one_line_error(_run("merge", recipe, "--dry-run"), said)


def test_base_that_is_not_a_checkpoint(tmp_path, inputs):
    recipe = _write(tmp_path, "full", [inputs["ft0"]], inputs["lora1"])
    _one_line_error(_run("merge", recipe, "--dry-run"), "base_model", "is a LoRA adapter")


def test_full_dry_run_counts_match_plan_checkpoint(tmp_path, inputs):
    from peft_orthomerge.plan.checkpoint import compile_patterns, plan_checkpoint
    from peft_orthomerge.plan.options import DecoupleOptions
    from peft_orthomerge.recipe.preview_facts import module_type
    from peft_orthomerge.sources.checkpoint import open_checkpoint

    method = {"residual": "ties", "exclude": "lm_head"}
    recipe = _write(tmp_path, "full", [inputs["ft0"], inputs["ft1"]], inputs["base"], method=method)
    result = _run("merge", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    base_dir, base = open_checkpoint(inputs["base"], False)
    tasks = plan_checkpoint(base, base_dir, DecoupleOptions(residual="ties"), exclude=compile_patterns("lm_head", "x"))
    expected: dict[str, Counter] = {}
    for t in tasks:
        expected.setdefault(module_type(t.name), Counter())[t.path] += 1
    assert summary["groups"] == {k: dict(v) for k, v in expected.items()}
    assert summary["groups"]["lm_head"] == {"euclidean": 1} and summary["groups"]["q_proj"] == {"dense": 2}
    decoupled = [t for t in tasks if t.decoupled]
    assert summary["work"]["polar_factors"]["count"] == 2 * len(decoupled)
    assert summary["memory"]["peak_bytes"] > 0
    assert [i["kind"] for i in summary["inputs"]] == ["full", "full"]
    text = _run("merge", recipe, "--dry-run")
    assert text.exit_code == 0, text.output
    for fragment in ("module type", "dense", "euclidean", "q_proj", "polar factors", "peak memory", "nothing was"):
        assert fragment in text.stdout, fragment
    assert not (tmp_path / "merged").exists()


def test_full_dry_run_ta_paths(tmp_path, inputs):
    recipe = _write(tmp_path, "full", [inputs["ft0"], inputs["ft1"]], inputs["base"])
    summary = json.loads(_run("merge", recipe, "--dry-run", "--json").stdout)
    groups = summary["groups"]
    assert (
        groups["q_proj"] == {"rows": 2}
        and groups["down_proj"] == {"reduced": 2}
        and groups["k_proj"] == {"reduced": 2}
    )
    assert groups["input_layernorm"] == {"euclidean": 2}


def test_full_dry_run_refuses_other_shapes(tmp_path, inputs):
    from conftest import build_tiny_llama

    other = tmp_path / "other"
    build_tiny_llama(intermediate_size=96).save_pretrained(other)
    recipe = _write(tmp_path, "full", [inputs["ft0"]], other)
    _one_line_error(_run("merge", recipe, "--dry-run"), "shape mismatch")


def test_lora_dry_run_checks_shapes_against_the_base(tmp_path, inputs):
    from conftest import build_tiny_llama

    recipe = _write(tmp_path, "lora", [inputs["lora0"], inputs["lora1"]], inputs["base"])
    summary = json.loads(_run("merge", recipe, "--dry-run", "--json").stdout)
    assert summary["groups"] == {"q_proj": {"rows": 2}, "v_proj": {"reduced": 2}, "down_proj": {"reduced": 2}}
    other = tmp_path / "other"
    build_tiny_llama(hidden_size=32, intermediate_size=96).save_pretrained(other)
    recipe = _write(tmp_path, "lora", [inputs["lora0"]], other)
    _one_line_error(_run("merge", recipe, "--dry-run"), "LoRA weights imply a base weight of shape")


def test_oft_folded_dry_run_checks_block_sizes_against_the_base(tmp_path, inputs):
    from conftest import build_tiny_llama

    out = {"path": "merged", "format": "folded"}
    recipe = _write(tmp_path, "oft", [inputs["oft0"], inputs["oft1"]], inputs["base"], output=out)
    result = _run("merge", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["groups"]["q_proj"] == {"folded": 2} and summary["groups"]["lm_head"] == {"copy": 1}
    other = tmp_path / "other"
    build_tiny_llama(hidden_size=60, num_attention_heads=6, intermediate_size=96).save_pretrained(other)
    recipe = _write(tmp_path, "oft", [inputs["oft0"]], other, output=out)
    _one_line_error(_run("merge", recipe, "--dry-run"), "do not fit the base weight")


def test_oft_adapter_dry_run_text(tmp_path, inputs):
    recipe = _write(tmp_path, "oft", [inputs["oft0"], inputs["oft1"]], None)
    result = _run("merge", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "OFT adapter space" in result.stdout and "skew blocks" in result.stdout
    assert "merge_oft_checkpoints(" in result.stdout


def test_json_needs_dry_run(tmp_path, inputs):
    recipe = _write(tmp_path, "oft", [inputs["oft0"]], None)
    _one_line_error(_run("merge", recipe, "--json"), "--json only applies with --dry-run")


def test_lora_dry_run_refuses_tied_embeddings(tmp_path):
    from conftest import build_tiny_llama
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "tied"
    build_tiny_llama(tie_word_embeddings=True).save_pretrained(base)
    model = get_peft_model(
        build_tiny_llama(tie_word_embeddings=True), LoraConfig(r=2, target_modules=["embed_tokens"])
    )
    model.save_pretrained(tmp_path / "lora")
    recipe = _write(tmp_path, "lora", [tmp_path / "lora"], base)
    _one_line_error(_run("merge", recipe, "--dry-run"), "tie_word_embeddings")
    from peft_orthomerge import merge_lora_adapters
    from peft_orthomerge.errors import IncompatibleInputsError

    with pytest.raises(IncompatibleInputsError, match="tied"):  # the real run refuses it as well
        merge_lora_adapters(build_tiny_llama(tie_word_embeddings=True), [str(tmp_path / "lora")])


def test_human_bytes_uses_binary_units():
    from peft_orthomerge.units import human_bytes

    sizes = [0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30, 2**40, 5 * 2**50]
    assert [human_bytes(n) for n in sizes] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "1.0 TiB", "5120.0 TiB",
    ]  # fmt: skip
