"""Every ``examples/*.py`` runs to completion offline; every example recipe validates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_orthomerge.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
TIMEOUT_S = 300


def test_there_are_examples():
    assert any(p.name == "recipe_cli.py" for p in EXAMPLES)
    assert {p.name for p in RECIPES} >= {
        "oft_adapter.yaml",
        "oft_folded.yaml",
        "lora_decoupled.yaml",
        "full_models.yaml",
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PEFT_ORTHOMERGE_QUIET="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} did not finish within {TIMEOUT_S} s")
    assert proc.returncode == 0, (
        f"{script.name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipes_validate(recipe):
    parsed = load_recipe(recipe)
    assert parsed.base_dir == recipe.parent.resolve()
    assert not Path(parsed.output.path).is_absolute()
