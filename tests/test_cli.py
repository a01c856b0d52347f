"""The ``peft-orthomerge`` command line: merge / inspect / report, errors as one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _cli_utils import build_oft_inputs
from click.testing import CliRunner
from safetensors.torch import load_file

from peft_orthomerge import cli, hub
from peft_orthomerge.recipe import RECIPE_FILE
from peft_orthomerge.report import REPORT_FILE


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_oft_inputs(tmp_path_factory.mktemp("cli_inputs"))


def _recipe(root: Path, inputs, **overrides) -> dict:
    data = {
        "kind": "oft",
        "base_model": str(inputs["base"]),
        "inputs": [
            {"path": str(inputs["oft0"]), "weight": 2.0},
            {"path": str(inputs["oft1"])},
            {"path": str(inputs["oft2"])},
        ],
        "method": {"name": "orthomerge", "granularity": "module"},
        "output": {"path": "./merged", "format": "adapter"},
    }
    data.update(overrides)
    return data


def _write(root: Path, data, name="recipe.yaml") -> Path:
    path = root / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _run(*args, **kwargs):
    return CliRunner().invoke(cli.main, [str(a) for a in args], **kwargs)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_merge_equals_python_api_and_is_reproducible(tmp_path, inputs):
    from peft_orthomerge import merge_oft_checkpoints

    recipe = _write(tmp_path, _recipe(tmp_path, inputs))
    result = _run("merge", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "merged"
    assert "OrthoMerge report: oft / orthomerge" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", REPORT_FILE, RECIPE_FILE):
        assert (out / name).is_file(), name
    api_out = tmp_path / "api"
    merge_oft_checkpoints([str(inputs[f"oft{i}"]) for i in range(3)], api_out, weights=[2.0, 1.0, 1.0])
    cli_tensors = load_file(out / "adapter_model.safetensors")
    api_tensors = load_file(api_out / "adapter_model.safetensors")
    assert cli_tensors.keys() == api_tensors.keys() and len(cli_tensors) == 8
    for key in cli_tensors:
        assert torch.equal(cli_tensors[key], api_tensors[key]), key
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (api_out / "adapter_config.json").read_text()
    )
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["output_path"] == str(out) and report["weights"] == pytest.approx([0.5, 0.25, 0.25])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "orthomerge" in card
    # the recorded recipe reproduces the output
    again = _run("merge", out / RECIPE_FILE, "--out", tmp_path / "again", "--quiet")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == str(tmp_path / "again")
    for key, value in load_file(tmp_path / "again" / "adapter_model.safetensors").items():
        assert torch.equal(value, cli_tensors[key])


def test_folded_merge_equals_python_api(tmp_path, inputs):
    from peft_orthomerge import merge_oft_checkpoints

    data = _recipe(tmp_path, inputs, method={"name": "mean_r"}, output={"path": "folded", "format": "folded"})
    result = _run("merge", _write(tmp_path, data), "--quiet")
    assert result.exit_code == 0, result.output
    merge_oft_checkpoints(
        [str(inputs[f"oft{i}"]) for i in range(3)],
        tmp_path / "api",
        weights=[2, 1, 1],
        method="mean_r",
        fold_into=str(inputs["base"]),
    )
    a = load_file(tmp_path / "folded" / "model.safetensors")
    b = load_file(tmp_path / "api" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "folded" / "config.json").is_file() and (tmp_path / "folded" / RECIPE_FILE).is_file()


def test_dry_run_writes_nothing(tmp_path, inputs):
    recipe = _write(tmp_path, _recipe(tmp_path, inputs))
    before = _tree(tmp_path)
    result = _run("merge", recipe, "--dry-run", "--push-to-hub", "me/x")
    assert result.exit_code == 0, result.output
    assert "merge_oft_checkpoints(" in result.stdout and "nothing was written" in result.stdout
    assert "push_to_hub(" in result.stdout
    assert _tree(tmp_path) == before


BAD_RECIPES = {
    "malformed_yaml": ("kind: oft\ninputs: [\n", "malformed YAML at line"),
    "unknown_key": (
        {"kind": "oft", "inputs": [{"path": "a"}], "output": {"path": "m"}, "methd": {}},
        "valid keys here",
    ),
    "wrong_kind": ({"kind": "qlora", "inputs": [{"path": "a"}], "output": {"path": "m"}}, "unknown kind 'qlora'"),
    "wrong_format": (
        {"kind": "oft", "inputs": [{"path": "a"}], "output": {"path": "m", "format": "model"}},
        "output.format",
    ),
    "missing_inputs": ({"kind": "oft", "output": {"path": "m"}}, "missing required key 'inputs'"),
    "missing_input_dir": (
        {"kind": "oft", "inputs": [{"path": "no_such_adapter"}], "output": {"path": "m"}},
        "input not found",
    ),
    "hub_unreachable": (
        {"kind": "oft", "inputs": [{"path": "no-such-org/no-such-adapter"}], "output": {"path": "m"}},
        "no-such-org/no-such-adapter",
    ),
    "escaping_output": ({"kind": "oft", "inputs": [{"path": "a"}], "output": {"path": "../../m"}}, "escapes"),
    "not_an_oft_adapter": ({"kind": "oft", "inputs": [{"path": "a"}], "output": {"path": "m"}}, "adapter_config.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_exit_2_one_line_nothing_written(tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a").mkdir()  # an empty directory: not an adapter
    data, fragment = BAD_RECIPES[case]
    recipe = _write(tmp_path, data)
    before = _tree(tmp_path)
    _assert_one_line_error(_run("merge", recipe), fragment)
    assert _tree(tmp_path) == before


def test_existing_output_dir(tmp_path, inputs):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "precious.txt").write_text("keep")
    recipe = _write(tmp_path, _recipe(tmp_path, inputs))
    _assert_one_line_error(_run("merge", recipe), "exists", "--overwrite")
    assert _tree(tmp_path / "merged") == ["precious.txt"]
    result = _run("merge", recipe, "--overwrite", "--quiet")
    assert result.exit_code == 0 and not (tmp_path / "merged" / "precious.txt").exists()


def test_missing_recipe_and_usage_errors(tmp_path):
    _assert_one_line_error(_run("merge", tmp_path / "nope.yaml"), "recipe file not found")
    _assert_one_line_error(_run("merge", tmp_path / "nope.yaml", "--device", "tpu"), "--device")
    _assert_one_line_error(_run("merge", tmp_path / "nope.yaml", "--private"), "--push-to-hub")
    _assert_one_line_error(_run("merge", tmp_path / "nope.yaml", "--push-to-hub", "not a repo"), "repo id")
    _assert_one_line_error(_run("frobnicate"), "No such command")


def test_unexpected_exception_is_one_line_and_debug_shows_it(tmp_path, inputs, monkeypatch):
    import peft_orthomerge.recipe as recipe_mod

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(recipe_mod, "run_recipe", boom)
    recipe = _write(tmp_path, _recipe(tmp_path, inputs))
    _assert_one_line_error(_run("merge", recipe), "unexpected RuntimeError: kaboom second line", "--debug")
    result = _run("--debug", "merge", recipe)
    assert isinstance(result.exception, RuntimeError)


def test_push_to_hub_after_merge(tmp_path, inputs, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return "https://huggingface.co/me/merged/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    result = _run(
        "merge", _write(tmp_path, _recipe(tmp_path, inputs)), "--push-to-hub", "me/merged", "--private", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert calls[1] == (
        "create_repo",
        {"repo_id": "me/merged", "repo_type": "model", "private": True, "exist_ok": True},
    )
    assert calls[2][1]["folder_path"] == str(tmp_path / "merged")
    assert "pushed to https://huggingface.co/me/merged/commit/1" in result.stdout


def _canonical_vectors(path: Path) -> torch.Tensor:
    config = json.loads((path / "adapter_config.json").read_text())
    sign = 1.0 if config["use_cayley_neumann"] else -1.0
    tensors = load_file(path / "adapter_model.safetensors")
    return torch.cat([sign * tensors[k].double().flatten() for k in sorted(tensors)])


def test_inspect_json_against_independent_computation(inputs):
    refs = [inputs[f"oft{i}"] for i in range(3)]
    result = _run("inspect", *refs, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    info = data["inputs"][1]
    assert info["type"] == "oft" and info["block_sizes"] == [8] and info["modules"] == 8
    assert info["targets"] == sorted(["q_proj", "v_proj", "up_proj", "down_proj"])
    assert info["flags"]["use_cayley_neumann"] is False and info["dtypes"] == ["F32"]
    vecs = [_canonical_vectors(p) for p in refs]
    for i in range(3):
        for j in range(3):
            expected = float(vecs[i] @ vecs[j] / (vecs[i].norm() * vecs[j].norm()))
            assert data["relations"]["cosine"][i][j] == pytest.approx(expected, abs=1e-12)
    shares = data["relations"]["conflicting_row_share"]
    assert all(0.0 < s < 1.0 for s in shares)
    norms = data["relations"]["module_norms"]["model.layers.0.self_attn.q_proj"]
    raw = load_file(refs[0] / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"
    ]
    assert norms[0] == pytest.approx(float(2**0.5 * raw.double().norm()))
    text = _run("inspect", *refs)
    assert text.exit_code == 0 and "pairwise cosine" in text.stdout and "conflicting rows" in text.stdout


def test_inspect_single_checkpoint_and_errors(tmp_path, inputs):
    result = _run("inspect", inputs["base"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)["inputs"][0]
    assert info["type"] == "full" and info["model_type"] == "llama" and info["parameters"] > 0
    _assert_one_line_error(_run("inspect", inputs["oft0"], inputs["base"]), "different types")
    _assert_one_line_error(_run("inspect", tmp_path / "missing"), "missing")


@pytest.fixture(scope="module")
def decoupled_inputs(inputs):
    from _cli_utils import build_lora_and_full_inputs

    return {**inputs, **build_lora_and_full_inputs(inputs["base"].parent, inputs["base"])}


def test_lora_model_merge_equals_python_api(tmp_path, decoupled_inputs):
    from transformers import AutoModelForCausalLM

    from peft_orthomerge import merge_lora_adapters

    p = decoupled_inputs
    data = {
        "kind": "lora",
        "base_model": str(p["base"]),
        "inputs": [{"path": str(p["lora0"])}, {"path": str(p["lora1"]), "weight": 3}],
        "method": {"target": "conflict", "residual": "ties"},
        "output": {"path": "out"},
    }
    result = _run("merge", _write(tmp_path, data), "--quiet")
    assert result.exit_code == 0, result.output
    expected = merge_lora_adapters(
        AutoModelForCausalLM.from_pretrained(p["base"]),
        [str(p["lora0"]), str(p["lora1"])],
        [1, 3],
        target="conflict",
        residual="ties",
    ).state_dict()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) <= set(expected) and len(saved) > 10
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(
        reloaded.model.layers[1].self_attn.q_proj.weight, expected["model.layers.1.self_attn.q_proj.weight"]
    )
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["kind"] == "lora" and report["output_path"] == str(tmp_path / "out")
    assert "library_name: transformers" in (tmp_path / "out" / "README.md").read_text()


def test_lora_adapter_export(tmp_path, decoupled_inputs):
    p = decoupled_inputs
    data = {
        "kind": "lora",
        "base_model": str(p["base"]),
        "inputs": [{"path": str(p["lora0"])}, {"path": str(p["lora1"])}],
        "method": {"rank": 4},
        "output": {"path": "out", "format": "lora"},
    }
    result = _run("merge", _write(tmp_path, data), "--quiet")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "library_name: peft" in (out / "README.md").read_text() and (out / RECIPE_FILE).is_file()
    diag = _run("report", out, "--no-plots")
    assert diag.exit_code == 0, diag.output
    drift_rows = json.loads((out / "diagnostics" / "report.json").read_text())["drift"]
    assert len(drift_rows) == 6 and all(r["relative_frobenius_change"] > 0 for r in drift_rows)


def test_full_merge_equals_python_api(tmp_path, decoupled_inputs):
    from peft_orthomerge import merge_models

    p = decoupled_inputs
    data = {
        "kind": "full",
        "base_model": str(p["base"]),
        "inputs": [{"path": str(p["ft0"])}, {"path": str(p["ft1"])}],
        "method": {"target": "global", "residual": "ta", "residual_kwargs": {"lam": 0.5}, "exclude": "embed_tokens"},
        "output": {"path": "out"},
    }
    result = _run("merge", _write(tmp_path, data), "--quiet")
    assert result.exit_code == 0, result.output
    merge_models(
        str(p["base"]),
        [str(p["ft0"]), str(p["ft1"])],
        tmp_path / "api",
        target="global",
        residual="ta",
        residual_kwargs={"lam": 0.5},
        exclude="embed_tokens",
    )
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diag = _run("report", tmp_path / "out")
    assert diag.exit_code == 0, diag.output
    diag_data = json.loads((tmp_path / "out" / "diagnostics" / "report.json").read_text())
    assert diag_data["drift"] and diag_data["decoupled"] and "decoupled_norms.png" in diag_data["plots"]


def test_inspect_lora_against_independent_computation(decoupled_inputs):
    refs = [decoupled_inputs["lora0"], decoupled_inputs["lora1"]]
    result = _run("inspect", *refs, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"][0]["type"] == "lora" and data["inputs"][0]["ranks"] == [4]
    assert data["inputs"][0]["targets"] == ["down_proj", "q_proj", "v_proj"]
    deltas = []
    for ref in refs:
        t = load_file(ref / "adapter_model.safetensors")
        mods = sorted({k.rsplit(".lora_", 1)[0] for k in t})
        deltas.append({m: (8 / 4) * t[f"{m}.lora_B.weight"].double() @ t[f"{m}.lora_A.weight"].double() for m in mods})
    flat = [torch.cat([d[m].flatten() for m in sorted(d)]) for d in deltas]
    expected = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert data["relations"]["cosine"][0][1] == pytest.approx(expected, abs=1e-12)
    # conflicting rows: rows of delta_i whose cosine with the mean delta is negative
    conflicts = [0, 0]
    total = [0, 0]
    for m in deltas[0]:
        mean = (deltas[0][m] + deltas[1][m]) / 2
        for i in range(2):
            dots = (deltas[i][m] * mean).sum(dim=1)
            active = (deltas[i][m].norm(dim=1) > 0) & (mean.norm(dim=1) > 0)
            conflicts[i] += int(((dots < 0) & active).sum())
            total[i] += int(active.sum())
    assert data["relations"]["conflicting_row_share"] == pytest.approx([c / t for c, t in zip(conflicts, total)])
    name = "model.layers.1.mlp.down_proj"
    key = f"base_model.model.{name}"
    assert data["relations"]["module_norms"][name][1] == pytest.approx(float(deltas[1][key].norm()))


def test_demo_command():
    result = _run("demo")
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in result.stdout
