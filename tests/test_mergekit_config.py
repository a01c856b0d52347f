"""mergekit configurations: translation, refusals, CLI end to end, and tensors against mergekit 0.1.5.

The comparison with mergekit itself needs the optional dependency (``pip install mergekit==0.1.5``,
or the ``compare`` extra) and is skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import build_tiny_llama
from safetensors.torch import load_file

from peft_orthomerge import cli
from peft_orthomerge.errors import ConfigError
from peft_orthomerge.ops.registry import get_euclidean
from peft_orthomerge.recipe import load_recipe, parse_recipe, run_recipe
from peft_orthomerge.recipe.mergekit import is_mergekit_config, mergekit_to_recipe

WEIGHTS = (1.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny float32 Llama base and three perturbed copies of it."""
    root = tmp_path_factory.mktemp("mk")
    base = build_tiny_llama()
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for seed in (1, 2, 3):
        model = build_tiny_llama()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"e{seed}")
        paths[f"e{seed}"] = root / f"e{seed}"
    return paths


def _config(method: str, models: dict[str, Path], *, density=None, weights=WEIGHTS, **params) -> dict:
    entries = []
    for i, w in enumerate(weights):
        own = {} if w is None else {"weight": w}
        if density is not None:
            own["density"] = density
        entries.append({"model": str(models[f"e{i + 1}"]), "parameters": own})
    cfg = {"merge_method": method, "base_model": str(models["base"]), "models": entries, "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    return cfg


# -- translation (no mergekit needed) ----------------------------------------------------------------
def test_detection():
    assert is_mergekit_config({"merge_method": "ties", "models": []})
    assert not is_mergekit_config({"kind": "full", "merge_method": "ties"})
    assert not is_mergekit_config(["merge_method"])


def test_ties_translation_folds_weights_and_drops_base_entry():
    cfg = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": "org/b", "parameters": {"weight": 3.0}},
            {"model": "org/base"},
        ],
        "parameters": {"density": 0.4, "int8_mask": True, "normalize": False, "lambda": 0.5},
    }
    recipe = mergekit_to_recipe(cfg)
    assert recipe["kind"] == "full" and recipe["base_model"] == "org/base"
    assert recipe["inputs"] == [{"path": "org/a", "weight": 1.0}, {"path": "org/b", "weight": 3.0}]
    method = recipe["method"]
    assert method["name"] == "euclidean" and method["residual"] == "mergekit_ties"
    assert method["residual_kwargs"] == {"density": 0.4, "lam": 0.5 * 4.0, "normalize": False}  # lambda * S


def test_task_arithmetic_is_our_ta_with_folded_lambda():
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "b/b",
        "models": [{"model": "x/a", "parameters": {"weight": 2.0}}, {"model": "x/c", "parameters": {"weight": 1.0}}],
    }
    method = mergekit_to_recipe(cfg)["method"]
    assert method["residual"] == "ta" and method["residual_kwargs"] == {"lam": 3.0 / 2}
    cfg["parameters"] = {"normalize": True, "lambda": 2.0}
    assert mergekit_to_recipe(cfg)["method"]["residual_kwargs"] == {"lam": 2.0 / 2}


def test_karcher_merges_the_base_too_and_takes_no_weights():
    cfg = {"merge_method": "karcher", "base_model": "b/b", "models": [{"model": "x/a"}, {"model": "x/c"}]}
    recipe = mergekit_to_recipe(cfg)
    assert [i["path"] for i in recipe["inputs"]] == ["b/b", "x/a", "x/c"]
    assert {i["weight"] for i in recipe["inputs"]} == {1.0}
    no_base = mergekit_to_recipe({"merge_method": "karcher", "models": ["x/a", "x/c"], "parameters": {"max_iter": 20}})
    assert no_base["base_model"] == "x/a" and no_base["method"]["residual_kwargs"] == {"max_iter": 20}


def test_orthomerge_forms():
    models = [
        {"model": "x/a", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "x/c", "parameters": {"weight": 1.0}},
    ]
    short = mergekit_to_recipe(
        {
            "merge_method": "orthomerge_ties",
            "base_model": "b/b",
            "models": models,
            "parameters": {"target": "conflict", "density": 0.5},
        }
    )
    assert short["method"] == {
        "name": "orthomerge",
        "target": "conflict",
        "residual": "mergekit_ties",
        "residual_kwargs": {"density": 0.5, "lam": 1.0, "normalize": True},
    }
    plain = [{"model": "x/a", "parameters": {"weight": 2.0}}, {"model": "x/c"}]
    ours = mergekit_to_recipe(
        {
            "merge_method": "orthomerge",
            "base_model": "b/b",
            "models": plain,
            "parameters": {"residual": "ties", "density": 0.3},
        }
    )
    assert ours["method"]["residual"] == "ties" and ours["method"]["residual_kwargs"] == {"density": 0.3}
    assert [i["weight"] for i in ours["inputs"]] == [2.0, 1.0]
    tsvm = mergekit_to_recipe({"merge_method": "orthomerge_tsvm", "base_model": "b/b", "models": plain})
    assert tsvm["method"]["residual"] == "tsvm" and tsvm["method"]["target"] == "global"


def test_parsed_recipe_is_marked_and_needs_out(models):
    recipe = parse_recipe(_config("ties", models, density=0.5))
    assert recipe.origin == "mergekit" and recipe.method.precision == "float32"
    with pytest.raises(ConfigError, match="names no output directory"):
        run_recipe(recipe, dry_run=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerp"}, "'merge_method': 'slerp' is not supported"),
        ({"merge_method": "model_stock"}, "'model_stock' is not supported"),
        ({"slices": [{"sources": []}]}, "key 'slices'"),
        ({"tokenizer": {"source": "union"}}, "key 'tokenizer'"),
        ({"chat_template": "chatml"}, "key 'chat_template'"),
        ({"tokenizer_source": "union"}, "key 'tokenizer_source'"),
        ({"out_dtype": "bfloat16"}, "key 'out_dtype'"),
        ({"dtype": "int8"}, "key 'dtype'"),
        ({"frobnicate": 1}, "unknown key 'frobnicate'"),
        ({"base_model": None}, "'base_model' is required"),
        ({"parameters": {"density": [0.2, 0.8]}}, "parameters.density: per-layer gradients"),
        ({"parameters": {"epsilon": 0.1}}, "unknown parameter 'parameters.epsilon' for merge_method ties"),
        ({"models": [{"model": "a/b+c/lora", "parameters": {"weight": 1}}]}, "'model\\+lora' references"),
        ({"models": [{"model": "a/b", "parameters": {"weight": -1}}]}, "weight must be a number >= 0"),
        ({"models": [{"model": "a/b"}]}, "models\\[0\\].parameters.weight is required"),
        (
            {
                "models": [
                    {"model": "a/b", "parameters": {"weight": 1, "density": 0.2}},
                    {"model": "a/c", "parameters": {"weight": 1, "density": 0.5}},
                ]
            },
            "density differs between models",
        ),
    ],
)
def test_refusals_are_one_line_naming_the_key(change, message):
    cfg = {"merge_method": "ties", "base_model": "b/b", "models": [{"model": "a/b", "parameters": {"weight": 1.0}}]}
    cfg.update(change)
    with pytest.raises(ConfigError, match=message) as info:
        parse_recipe(cfg, source="cfg.yml")
    assert "\n" not in str(info.value) and "cfg.yml" in str(info.value)


def test_cli_refusal_exits_2_one_line(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [{"sources": []}]}))
    result = CliRunner().invoke(cli.main, ["merge", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "key 'slices'" in result.output
    assert not (tmp_path / "out").exists()


# -- end to end --------------------------------------------------------------------------------------
def _reference(models, residual, weights, **kwargs) -> dict[str, torch.Tensor]:
    """``base + residual(task vectors)`` per tensor, in float64, from the registry method itself."""
    base = load_file(models["base"] / "model.safetensors")
    experts = [load_file(models[f"e{i}"] / "model.safetensors") for i in (1, 2, 3)]
    total = sum(weights)
    fn = get_euclidean(residual)
    out = {}
    for key, b in base.items():
        b64 = b.double()
        taus = [e[key].double() - b64 for e in experts]
        out[key] = (b64 + fn(taus, [w / total for w in weights], base=b64, **kwargs)).float()
    return out


def test_cli_merge_dry_run_and_recipe(models, tmp_path):
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(_config("ties", models, density=0.5)))
    runner = CliRunner()
    dry = runner.invoke(cli.main, ["merge", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "mergekit_ties" in dry.output and not (tmp_path / "out").exists()
    result = runner.invoke(cli.main, ["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    merged = load_file(out / "model.safetensors")
    expected = _reference(models, "mergekit_ties", WEIGHTS, density=0.5, normalize=True, lam=1.0)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    written = (out / "orthomerge_recipe.yaml").read_text()
    assert "Translated from a mergekit config" in written
    again = load_recipe(out / "orthomerge_recipe.yaml")  # our own format, reproducible
    assert again.origin == "recipe" and again.method.residual == "mergekit_ties"


def test_one_line_change_to_orthomerge(models, tmp_path):
    cfg = _config("orthomerge_ties", models, density=0.5)
    recipe = parse_recipe(cfg)
    assert recipe.method.name == "orthomerge" and recipe.method.residual == "mergekit_ties"
    run_recipe(recipe, out=tmp_path / "om", quiet=True)
    merged = load_file(tmp_path / "om" / "model.safetensors")
    ties = _reference(models, "mergekit_ties", WEIGHTS, density=0.5, normalize=True, lam=1.0)
    key = "model.layers.0.self_attn.q_proj.weight"  # decoupled: a rotation of the base plus the residual
    assert not torch.allclose(merged[key], ties[key], atol=1e-6)
    norm = "model.norm.weight"  # 1-D: the residual method alone, as mergekit's TIES
    torch.testing.assert_close(merged[norm], ties[norm], rtol=1e-5, atol=1e-6)


# -- against mergekit 0.1.5 --------------------------------------------------------------------------
def _mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    return load_file(out / "model.safetensors")


def _ours(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    run_recipe(parse_recipe(cfg), out=out, quiet=True)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    ("method", "density", "params"),
    [
        ("task_arithmetic", None, {}),
        ("task_arithmetic", None, {"normalize": True, "lambda": 0.7}),
        ("ties", 0.5, {}),
        ("ties", 0.3, {"normalize": False, "lambda": 0.8, "int8_mask": True}),
        ("dare_ties", 1.0, {}),
        ("dare_linear", 1.0, {"normalize": True}),
        ("karcher", None, {}),
    ],
)
def test_same_tensors_as_mergekit(models, tmp_path, method, density, params):
    pytest.importorskip("mergekit")
    cfg = _config(method, models, density=density, weights=(None,) * 3 if method == "karcher" else WEIGHTS, **params)
    theirs = _mergekit(cfg, tmp_path / "mergekit")
    ours = _ours(cfg, tmp_path / "ours")
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=2e-5, atol=2e-6, msg=f"{method}: {key}")


def test_dare_with_drops_follows_mergekit_definition(models, tmp_path):
    """With density < 1 the masks differ (different generators): check kept share and the L1 rescale."""
    cfg = _config("dare_linear", models, density=0.5, weights=(1.0, 0.0, 0.0))
    ours = _ours(cfg, tmp_path / "ours")
    base = load_file(models["base"] / "model.safetensors")
    expert = load_file(models["e1"] / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tau, merged = (expert[key] - base[key]).double(), (ours[key] - base[key]).double()
    kept = merged.abs() > 1e-7
    assert abs(kept.double().mean().item() - 0.5) < 0.03
    torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
