"""`merge_models(..., export="lora", rank=r)`: a mixed merge written as a PEFT LoRA adapter.

The adapter is loaded by PEFT itself (`PeftModel.from_pretrained`) and folded (`merge_and_unload`):
with a rank at least the full rank it must be the full merge (float64, to rounding); with a small
rank every weight must be the base plus the best rank-r approximation of the merged delta, computed
here independently by `torch.linalg.svd` (Eckart-Young). Changed tensors no LoRA module can hold
are refused, with nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _lora_utils import make_lora_adapter, perturbed_state, single_thread  # noqa: F401  (autouse fixture)
from _oft_utils import make_oft_adapter
from click.testing import CliRunner
from conftest import build_tiny_llama
from safetensors.torch import load_file

from peft_orthomerge import ConfigError, merge_models
from peft_orthomerge.cli import main
from peft_orthomerge.recipe import load_recipe, run_recipe

FULL_RANK = 64  # hidden size: no weight of the tiny Llama has a larger rank


def _base64():
    return build_tiny_llama().double()


def _matrices_only(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full fine-tune that trained only the 2-D weights (norms kept at the base value)."""
    return {k: (v if v.dim() == 2 else base[k].clone()) for k, v in state.items()}


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    base = _base64()
    base.save_pretrained(root / "base")
    full = _base64()
    full.load_state_dict(_matrices_only(perturbed_state(_base64(), seed=51), base.state_dict()))
    full.save_pretrained(root / "full")
    make_lora_adapter(_base64, root / "lora", seed=52, r=4, target_modules=["q_proj", "k_proj", "down_proj"])
    make_oft_adapter(root / "oft", seed=53, targets=("v_proj", "up_proj"), model=_base64())
    merge_models(root / "base", [root / "full", root / "lora", root / "oft"], root / "merged", [0.5, 0.3, 0.2])
    return root


def _experts(mix):
    return [mix / "full", mix / "lora", mix / "oft"]


def _folded(adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base64(), adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_a_full_rank_export_folds_to_the_full_merge(mix, tmp_path):
    report = merge_models(
        mix / "base", _experts(mix), tmp_path / "lora", [0.5, 0.3, 0.2], export="lora", rank=FULL_RANK
    )
    want = load_file(mix / "merged" / "model.safetensors")
    got = _folded(tmp_path / "lora")
    for name, w in want.items():
        assert torch.allclose(got[name], w, rtol=1e-10, atol=1e-10 * float(w.abs().max())), name
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == FULL_RANK and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str((mix / "base").resolve())
    assert (
        "model.embed_tokens" in config["target_modules"]
        and "model.layers.0.self_attn.o_proj" in config["target_modules"]
    )
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert report.params["lora_max_relative_error"] < 1e-12
    assert set(report.params["lora_relative_errors"]) == {k for k, v in want.items() if v.dim() == 2}


def _best_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float(s[rank:].norm() / s.norm())


def test_a_low_rank_export_is_the_best_rank_r_approximation_of_each_merged_delta(mix, tmp_path):
    rank = 3
    report = merge_models(mix / "base", _experts(mix), tmp_path / "lora", [0.5, 0.3, 0.2], export="lora", rank=rank)
    merged, base = load_file(mix / "merged" / "model.safetensors"), load_file(mix / "base" / "model.safetensors")
    got = _folded(tmp_path / "lora")
    errors = report.params["lora_relative_errors"]
    for name, w0 in base.items():
        if w0.dim() != 2:
            assert torch.equal(got[name], w0), name
            continue
        approx, err = _best_rank(merged[name] - w0, rank)
        torch.testing.assert_close(got[name], w0 + approx, rtol=1e-10, atol=1e-12)
        assert errors[name] == pytest.approx(err, rel=1e-9)
    stats = {m.name: m for m in report.modules}
    assert (
        stats["model.layers.0.self_attn.q_proj.weight"].extra["lora_relative_error"]
        == errors["model.layers.0.self_attn.q_proj.weight"]
    )
    assert report.params["lora_max_relative_error"] == max(errors.values()) > 0.1


def test_a_changed_norm_is_refused_naming_it_and_nothing_is_written(mix, tmp_path):
    full = _base64()
    full.load_state_dict(perturbed_state(_base64(), seed=54))  # norms trained too
    full.save_pretrained(tmp_path / "norms")
    with pytest.raises(ConfigError, match="not the weight of a Linear") as info:
        merge_models(mix / "base", [tmp_path / "norms"], tmp_path / "out", export="lora", rank=4)
    assert "layernorm" in str(info.value) and "export='model'" in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def _adapter_with_trained_copy(path, module: str):
    adapter = make_lora_adapter(_base64, path, seed=55, target_modules=["q_proj"], modules_to_save=[module])
    with torch.no_grad():  # a trained copy of the module
        adapter.base_model.model.get_submodule(module).modules_to_save["default"].weight.add_(0.01)
    adapter.save_pretrained(path)
    return path


def test_a_trained_modules_to_save_norm_is_refused(mix, tmp_path):
    adapter = _adapter_with_trained_copy(tmp_path / "mts", "model.norm")
    with pytest.raises(ConfigError, match="model.norm.weight"):
        merge_models(mix / "base", [adapter], tmp_path / "out", export="lora", rank=FULL_RANK)
    assert not (tmp_path / "out").exists()


def test_a_trained_modules_to_save_linear_is_held_as_a_lora_module(mix, tmp_path):
    """lm_head is a Linear: the merged delta of its trained copy is a LoRA module like any other."""
    adapter = _adapter_with_trained_copy(tmp_path / "mts", "lm_head")
    merge_models(mix / "base", [adapter], tmp_path / "full")
    merge_models(mix / "base", [adapter], tmp_path / "out", export="lora", rank=FULL_RANK)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"] and config["modules_to_save"] is None
    want, got = load_file(tmp_path / "full" / "model.safetensors"), _folded(tmp_path / "out")
    torch.testing.assert_close(got["lm_head.weight"], want["lm_head.weight"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 0, 2.5, True])
def test_a_lora_export_needs_a_positive_integer_rank(mix, tmp_path, rank):
    with pytest.raises(ConfigError, match="positive integer rank"):
        merge_models(mix / "base", _experts(mix), tmp_path / "out", export="lora", rank=rank)


def test_a_merge_that_changes_nothing_is_refused(mix, tmp_path):
    with pytest.raises(ConfigError, match="changes no weight"):
        merge_models(mix / "base", [mix / "base"], tmp_path / "out", export="lora", rank=2)
    assert not (tmp_path / "out").exists()


def test_a_tied_embedding_that_changes_is_refused(tmp_path):
    tied = build_tiny_llama(tie_word_embeddings=True).double()
    tied.save_pretrained(tmp_path / "base")
    ft = build_tiny_llama(tie_word_embeddings=True).double()
    ft.load_state_dict(_matrices_only(perturbed_state(ft, seed=56), tied.state_dict()))
    ft.save_pretrained(tmp_path / "ft")
    with pytest.raises(ConfigError, match="tied") as info:
        merge_models(tmp_path / "base", [tmp_path / "ft"], tmp_path / "out", export="lora", rank=2)
    assert "embed_tokens" in str(info.value)


def _recipe(root, out, fmt="lora", rank=FULL_RANK):
    method = {"name": "orthomerge", **({"rank": rank} if rank is not None else {})}
    data = {
        "kind": "mixed",
        "base_model": "./base",
        "inputs": [
            {"path": "./full", "weight": 0.5},
            {"path": "./lora", "weight": 0.3},
            {"path": "./oft", "weight": 0.2},
        ],
        "method": method,
        "output": {"path": f"./{out}", "format": fmt},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_mixed_recipe_with_format_lora_writes_the_same_adapter(mix, tmp_path):
    report = run_recipe(load_recipe(_recipe(mix, "recipe_lora")), out=tmp_path / "recipe")
    merge_models(mix / "base", _experts(mix), tmp_path / "api", [0.5, 0.3, 0.2], export="lora", rank=FULL_RANK)
    got = load_file(tmp_path / "recipe" / "adapter_model.safetensors")
    want = load_file(tmp_path / "api" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert report.params["export"] == "lora" and report.params["rank"] == FULL_RANK
    assert (tmp_path / "recipe" / "orthomerge_recipe.yaml").is_file()
    assert "PeftModel.from_pretrained" in (tmp_path / "recipe" / "README.md").read_text()


@pytest.mark.parametrize(
    ("fmt", "rank", "message"), [("lora", None, "needs method.rank"), ("model", 4, "only applies")]
)
def test_the_recipe_pairs_format_lora_with_a_rank(mix, fmt, rank, message):
    with pytest.raises(Exception, match=message):
        load_recipe(_recipe(mix, "bad", fmt=fmt, rank=rank))


def test_the_dry_run_shows_the_lora_export(mix):
    result = CliRunner().invoke(main, ["merge", str(_recipe(mix, "dry_lora", rank=8)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "export='lora', rank=8" in result.output
    assert "PEFT LoRA adapter 'default'" in result.output
    assert "LoRA export (rank 8): 16 weights" in result.output and "other 5 floating tensors" in result.output
