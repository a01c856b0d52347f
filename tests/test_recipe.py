"""Recipe validation: one clear ConfigError per mistake, path rules, and the plan it builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_orthomerge.errors import ConfigError, InputError, OutputError
from peft_orthomerge.recipe import (
    FullMethod,
    LoraMethod,
    OftMethod,
    load_recipe,
    parse_recipe,
    plan_recipe,
    recipe_to_yaml,
    run_recipe,
)


def _oft(**overrides):
    data = {"kind": "oft", "inputs": [{"path": "a"}, {"path": "b", "weight": 2}], "output": {"path": "merged"}}
    data.update(overrides)
    return data


def _write(tmp_path: Path, data, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _inputs(tmp_path: Path, *names: str) -> None:
    for n in names:
        (tmp_path / n).mkdir(parents=True, exist_ok=True)


def test_defaults_per_kind():
    r = parse_recipe(_oft())
    assert r.method == OftMethod() and r.output.format == "adapter"
    assert [i.weight for i in r.inputs] == [1.0, 2.0]
    lora = parse_recipe({"kind": "lora", "base_model": "org/base", "inputs": [{"path": "x"}], "output": {"path": "o"}})
    assert lora.method == LoraMethod() and lora.output.format == "model" and lora.method.target == "global"
    full = parse_recipe({"kind": "full", "base_model": "org/base", "inputs": [{"path": "x"}], "output": {"path": "o"}})
    assert full.method == FullMethod() and full.output.format == "model"


@pytest.mark.parametrize(
    "data, expected",
    [
        (_oft(extra=1), "valid keys here: base_model, inputs, kind, method, output"),
        (_oft(inputs=[{"path": "a", "wieght": 2}]), "valid keys here: path, weight"),
        (
            _oft(method={"granularty": "block"}),
            "'method.granularty'; valid keys here: name, granularity, cayley, scale",
        ),
        (_oft(output={"path": "m", "fmt": "adapter"}), "valid keys here: path, format"),
        (
            {
                "kind": "lora",
                "base_model": "o/b",
                "inputs": [{"path": "x"}],
                "method": {"granularity": "module"},
                "output": {"path": "o"},
            },
            "valid keys here: name, target, residual, residual_kwargs, solver, rank",
        ),
    ],
)
def test_unknown_keys_list_valid_ones(data, expected):
    with pytest.raises(ConfigError, match="unknown key") as info:
        parse_recipe(data, source="r.yaml")
    assert expected in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith("r.yaml: ")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"inputs": []}, "missing key 'kind'"),
        (_oft(kind="qlora"), "unknown kind 'qlora'; valid kinds: oft, lora, full"),
        (_oft(method={"name": "magic"}), "method.name"),
        (_oft(method={"name": "ties"}), "folded"),
        (_oft(output={"path": "m", "format": "model"}), "output.format"),
        (_oft(output={"path": "m", "format": "folded"}), "needs base_model"),
        (_oft(method={"name": "mean_r"}), "folded"),
        (_oft(inputs=[]), "inputs"),
        (_oft(inputs=[{"path": "a", "weight": -1}]), "inputs.0.weight"),
        (_oft(inputs=[{"path": "a", "weight": float("nan")}]), "inputs.0.weight"),
        (_oft(method={"scale": "big"}), "method.scale"),
        ({"kind": "oft", "inputs": [{"path": "a"}]}, "missing required key 'output'"),
        ({"kind": "lora", "inputs": [{"path": "a"}], "output": {"path": "o"}}, "needs base_model"),
        ({"kind": "full", "inputs": [{"path": "a"}], "output": {"path": "o"}}, "needs base_model"),
        (
            {
                "kind": "lora",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "output": {"path": "o", "format": "lora"},
            },
            "method.rank",
        ),
        (
            {
                "kind": "lora",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "method": {"rank": 4},
                "output": {"path": "o"},
            },
            "rank only applies",
        ),
        (
            {
                "kind": "full",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "output": {"path": "o", "format": "lora"},
            },
            "needs method.rank",  # kind: full takes format: lora with a rank (merge_models' LoRA export)
        ),
        (
            {
                "kind": "full",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "method": {"include": "(("},
                "output": {"path": "o"},
            },
            "regular expression",
        ),
        (
            {
                "kind": "full",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "method": {"name": "euclidean", "target": "global"},
                "output": {"path": "o"},
            },
            "euclidean",
        ),
        (
            {
                "kind": "full",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "method": {"target": None},
                "output": {"path": "o"},
            },
            "euclidean",
        ),
        (
            {
                "kind": "full",
                "base_model": "o/b",
                "inputs": [{"path": "a"}],
                "method": {"residual": "magic"},
                "output": {"path": "o"},
            },
            "method.residual",
        ),
        ([1, 2], "YAML mapping"),
    ],
)
def test_invalid_recipes(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_recipe(data)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_euclidean_baseline_has_no_target():
    r = parse_recipe(
        {
            "kind": "full",
            "base_model": "o/b",
            "inputs": [{"path": "a"}],
            "method": {"name": "euclidean", "residual": "ties"},
            "output": {"path": "o"},
        }
    )
    assert r.method.target is None and r.method.residual == "ties"


def test_malformed_yaml_one_line(tmp_path):
    path = _write(tmp_path, "kind: oft\ninputs: [\n  - path: a\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+, column \d+") as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_recipe_dir(tmp_path, monkeypatch):
    _inputs(tmp_path / "recipes", "a", "b")
    path = _write(tmp_path / "recipes", _oft())
    monkeypatch.chdir(tmp_path)  # cwd differs from the recipe's directory
    plan = plan_recipe(load_recipe(path))
    assert plan.inputs == [str(tmp_path / "recipes" / "a"), str(tmp_path / "recipes" / "b")]
    assert plan.output_dir == tmp_path / "recipes" / "merged"
    assert plan.function == "merge_oft_checkpoints"
    assert plan.kwargs == dict(
        weights=[1.0, 2.0],
        method="orthomerge",
        granularity="module",
        cayley="auto",
        scale=1.0,
        overwrite=False,
        device="cpu",
    )


def test_inputs_may_live_elsewhere(tmp_path):
    _inputs(tmp_path, "adapters/a")
    (tmp_path / "recipes").mkdir()
    path = _write(
        tmp_path / "recipes", _oft(inputs=[{"path": "../adapters/a"}, {"path": str(tmp_path / "adapters" / "a")}])
    )
    plan = plan_recipe(load_recipe(path))
    assert plan.inputs == [str(tmp_path / "adapters" / "a")] * 2


@pytest.mark.parametrize("out", ["../elsewhere", "/tmp/abs-output", "sub/../../x", "."])
def test_output_may_not_escape_recipe_dir(tmp_path, out):
    _inputs(tmp_path, "a", "b")
    recipe = load_recipe(_write(tmp_path, _oft(output={"path": out})))
    with pytest.raises(ConfigError, match="output.path"):
        plan_recipe(recipe)
    # an explicit --out (typed by the user) is not restricted
    assert plan_recipe(recipe, out=tmp_path.parent / "explicit").output_dir == tmp_path.parent / "explicit"


def test_output_inside_recipe_dir_with_dots_is_fine(tmp_path):
    _inputs(tmp_path, "a", "b")
    recipe = load_recipe(_write(tmp_path, _oft(output={"path": "sub/../merged"})))
    assert plan_recipe(recipe).output_dir == tmp_path / "merged"


def test_missing_input_and_unreachable_hub_id(tmp_path, monkeypatch):
    _inputs(tmp_path, "a")
    with pytest.raises(InputError, match="input not found") as info:
        plan_recipe(load_recipe(_write(tmp_path, _oft())))
    assert str(tmp_path / "b") in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(_write(tmp_path, _oft(inputs=[{"path": "a"}, {"path": "no-such-org/no-such-adapter"}])))
    with pytest.raises(InputError, match="no-such-org/no-such-adapter"):
        plan_recipe(recipe)


def test_existing_output_refused_unless_overwrite(tmp_path):
    _inputs(tmp_path, "a", "b", "merged")
    (tmp_path / "merged" / "keep.txt").write_text("x")
    recipe = load_recipe(_write(tmp_path, _oft()))
    with pytest.raises(OutputError, match="exists"):
        plan_recipe(recipe)
    assert plan_recipe(recipe, overwrite=True).kwargs["overwrite"] is True


def test_output_inside_input_refused(tmp_path):
    _inputs(tmp_path, "a", "b")
    recipe = load_recipe(_write(tmp_path, _oft(output={"path": "a/merged"})))
    with pytest.raises(OutputError, match="input"):
        plan_recipe(recipe)


def test_all_zero_weights(tmp_path):
    _inputs(tmp_path, "a", "b")
    recipe = load_recipe(_write(tmp_path, _oft(inputs=[{"path": "a", "weight": 0}, {"path": "b", "weight": 0}])))
    with pytest.raises(ConfigError, match="zero"):
        plan_recipe(recipe)


def test_plans_for_each_kind(tmp_path):
    _inputs(tmp_path, "a", "b", "base")
    folded = load_recipe(
        _write(tmp_path, _oft(base_model="base", method={"name": "mean_r"}, output={"path": "m", "format": "folded"}))
    )
    plan = plan_recipe(folded)
    assert plan.kwargs["fold_into"] == str(tmp_path / "base") and plan.kwargs["method"] == "mean_r"
    full = load_recipe(
        _write(
            tmp_path,
            {
                "kind": "full",
                "base_model": "base",
                "inputs": [{"path": "a"}, {"path": "b"}],
                "method": {
                    "target": "conflict",
                    "residual": "ties",
                    "residual_kwargs": {"density": 0.3},
                    "exclude": "lm_head",
                },
                "output": {"path": "m"},
            },
        )
    )
    plan = plan_recipe(full)
    assert plan.function == "merge_models"
    assert plan.args == [str(tmp_path / "base"), [str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "m"]
    assert plan.kwargs == dict(
        weights=[1.0, 1.0],
        target="conflict",
        residual="ties",
        residual_kwargs={"density": 0.3},
        solver="auto",
        include=None,
        exclude="lm_head",
        device="cpu",
        overwrite=False,
    )
    lora = load_recipe(
        _write(
            tmp_path,
            {
                "kind": "lora",
                "base_model": "base",
                "inputs": [{"path": "a"}],
                "method": {"name": "euclidean", "rank": 8},
                "output": {"path": "m", "format": "lora"},
            },
        )
    )
    plan = plan_recipe(lora)
    assert plan.function == "merge_lora_adapters"
    assert plan.kwargs == dict(
        weights=[1.0], target=None, residual="ta", residual_kwargs=None, solver="auto", export="lora", rank=8
    )
    assert "merge_lora_adapters('model'" in plan.describe()


def test_dry_run_writes_nothing(tmp_path):
    _inputs(tmp_path, "a", "b")
    recipe = load_recipe(_write(tmp_path, _oft()))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    plan = run_recipe(recipe, dry_run=True)
    assert plan.output_dir == tmp_path / "merged"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_recipe_roundtrip_yaml(tmp_path):
    recipe = parse_recipe(_oft(method={"name": "mean_q", "granularity": "block", "scale": 0.5}))
    again = parse_recipe(yaml.safe_load(recipe_to_yaml(recipe, header="# hi\n")))
    assert again == recipe
