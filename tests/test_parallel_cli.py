"""The CLI under real launchers: ``torchrun`` (``python -m torch.distributed.run``) and ``accelerate launch``.

Two CPU processes (gloo) merge the same recipe as one process and must write identical tensors;
only rank 0 prints; a rank that fails makes the whole run fail with its message, once, and
leaves no output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _cli_utils import build_oft_inputs
from conftest import build_tiny_llama
from safetensors.torch import save_file

from peft_orthomerge.plan.checkpoint import estimate_cost
from peft_orthomerge.sinks.parallel import split_by_cost
from peft_orthomerge.sources.tensors import TensorReader

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def full_inputs(tmp_path_factory):
    """A tiny Llama base and two full fine-tunes (base + noise), safetensors."""
    root = tmp_path_factory.mktemp("pcli_full")
    base = build_tiny_llama()
    base.save_pretrained(root / "base")
    for i in range(2):
        model = build_tiny_llama()
        gen = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"ft{i}")
    return root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"
    )
    return env


def _cli(launcher: str, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    prefix = {
        "single": [sys.executable, "-m", "peft_orthomerge"],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "peft_orthomerge",
        ],
        "accelerate": [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--multi_gpu",
            "--num_processes=2",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            "-m",
            "peft_orthomerge",
        ],
    }[launcher]
    return subprocess.run(
        [*prefix, "merge", str(recipe), *args], env=_env(), capture_output=True, text=True, timeout=300
    )


def _full_recipe(root: Path, inputs: Path, out: str = "merged") -> Path:
    data = {
        "kind": "full",
        "base_model": str(inputs / "base"),
        "inputs": [{"path": str(inputs / "ft0"), "weight": 2.0}, {"path": str(inputs / "ft1")}],
        "method": {"name": "orthomerge", "target": "global", "residual": "ta"},
        "output": {"path": out, "format": "model"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader.from_dir(directory, "model")
    return {k: reader.get(k) for k in reader.keys()}


def _assert_same_output(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    ra, rb = (
        json.loads((a / "orthomerge_report.json").read_text()),
        json.loads((b / "orthomerge_report.json").read_text()),
    )
    for r in (ra, rb):
        r.pop("output_path")
    assert ra == rb
    assert sorted(p.name for p in a.iterdir() if not p.name.startswith("model")) == sorted(
        p.name for p in b.iterdir() if not p.name.startswith("model")
    )


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_full_merge_two_processes_identical_to_one(tmp_path, full_inputs, launcher):
    recipe = _full_recipe(tmp_path, full_inputs)
    one = _cli("single", recipe, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(launcher, recipe, "--out", str(tmp_path / "two"), "--quiet")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 alone prints
    _assert_same_output(tmp_path / "one", tmp_path / "two")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.config.hidden_size == 64


def test_failing_rank_fails_the_cli_once_and_leaves_nothing(tmp_path, full_inputs):
    bad = tmp_path / "inputs"
    shutil.copytree(full_inputs, bad)
    reader = TensorReader.from_dir(bad / "base", "model")
    shapes = {k: reader.shape(k) for k in reader.keys()}
    rank1 = split_by_cost([(k, estimate_cost(s)) for k, s in shapes.items()], 2)[1]
    victim = next(k for k in rank1 if len(shapes[k]) == 2)
    state = {k: v.clone() for k, v in _tensors(bad / "ft1").items()}
    state[victim][0, 0] = float("nan")
    save_file(state, str(bad / "ft1" / "model.safetensors"), metadata={"format": "pt"})

    work = tmp_path / "work"
    work.mkdir()
    recipe = _full_recipe(work, bad)
    proc = _cli("torchrun", recipe, "--quiet")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(bad / "ft1" / "model.safetensors") in errors[0] and victim in errors[0] and "NaN" in errors[0]
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml"]


def test_oft_recipe_under_torchrun_runs_once(tmp_path_factory, tmp_path):
    inputs = build_oft_inputs(tmp_path_factory.mktemp("pcli_oft"), n=2)
    data = {
        "kind": "oft",
        "base_model": str(inputs["base"]),
        "inputs": [{"path": str(inputs["oft0"])}, {"path": str(inputs["oft1"])}],
        "output": {"path": "merged", "format": "folded"},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    one = _cli("single", recipe, "--out", str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("torchrun", recipe, "--out", str(tmp_path / "two"), "--quiet")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]
    _assert_same_output(tmp_path / "one", tmp_path / "two")


def test_merge_models_shard_size_and_device_options(tmp_path, full_inputs):
    from peft_orthomerge import ConfigError, merge_models

    experts = [full_inputs / "ft0", full_inputs / "ft1"]
    merge_models(
        full_inputs / "base", experts, tmp_path / "one", device="auto" if not torch.cuda.is_available() else "cpu"
    )
    merge_models(full_inputs / "base", experts, tmp_path / "many", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3 and all(p.stat().st_size < 40_000 + 70_000 for p in (tmp_path / "many").glob("model-*"))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="size"):
        merge_models(full_inputs / "base", experts, tmp_path / "bad", max_shard_size="lots")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            merge_models(full_inputs / "base", experts, tmp_path / "bad", device="cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]


def test_folded_oft_export_is_split_between_the_ranks(tmp_path_factory, tmp_path):
    """A folded OFT export goes through the same checkpoint sink as `merge_models`: under torchrun
    each rank folds its share of the tensors and writes its own shard, and the tensors are the
    ones a single process writes."""
    inputs = build_oft_inputs(tmp_path_factory.mktemp("pcli_oft_split"), n=2)
    data = {
        "kind": "oft",
        "base_model": str(inputs["base"]),
        "inputs": [{"path": str(inputs["oft0"])}, {"path": str(inputs["oft1"]), "weight": 3.0}],
        "method": {"name": "orthomerge", "granularity": "block"},
        "output": {"path": "merged", "format": "folded"},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    one = _cli("single", recipe, "--out", str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("torchrun", recipe, "--out", str(tmp_path / "two"), "--quiet")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "one").glob("model*.safetensors")) == ["model.safetensors"]
    assert len(list((tmp_path / "two").glob("model-0000?-of-00002.safetensors"))) == 2  # one shard per rank
    _assert_same_output(tmp_path / "one", tmp_path / "two")
