"""Fuzz entry: bytes -> YAML recipe file -> `recipe.load_recipe` and `recipe.plan_recipe`.

``plan_recipe`` is the dry run: it checks inputs (local paths, Hub ids in offline mode) and the
output directory and writes nothing. Anything other than an `OrthoMergeError` escaping is a crash,
and so is any file appearing outside the sandbox's inputs.

Run: ``python fuzz/fuzz_recipe.py -max_total_time=60`` (libFuzzer flags; needs atheris).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # before huggingface_hub is imported: never touch the network
    os.environ["HF_HUB_OFFLINE"] = "1"  # Hub ids resolve from an empty cache only
    os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="fuzz-hub-cache-")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import is_known_bug, provider, recipe_text

try:
    import atheris
except ImportError:
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["peft_orthomerge"]):
        from peft_orthomerge.errors import OrthoMergeError
        from peft_orthomerge.recipe import load_recipe, plan_recipe
else:
    from peft_orthomerge.errors import OrthoMergeError
    from peft_orthomerge.recipe import load_recipe, plan_recipe

_SANDBOX = Path(tempfile.mkdtemp(prefix="fuzz-recipe-"))
atexit.register(shutil.rmtree, _SANDBOX, True)
_WORK = _SANDBOX / "work"
for _name in ("a", "b", "base"):
    (_WORK / _name).mkdir(parents=True)
    (_WORK / _name / "adapter_config.json").write_text('{"peft_type": "OFT", "oft_block_size": 4}')
_RECIPE = _WORK / "recipe.yaml"


def _snapshot() -> list[str]:
    return sorted(str(p.relative_to(_SANDBOX)) for p in _SANDBOX.rglob("*"))


_EXPECTED = None

# Reported bugs, tolerated so fuzzing goes past them; each has a strict xfail test in
# tests/test_hostile_cli.py. Remove an entry once it is fixed.
KNOWN_BUGS: list[tuple[type, str, str]] = []


def check_recipe_bytes(data: bytes) -> None:
    global _EXPECTED
    _RECIPE.write_bytes(data)
    if _EXPECTED is None:
        _EXPECTED = _snapshot()
    try:
        recipe = load_recipe(_RECIPE)
        plan_recipe(recipe)
    except OrthoMergeError as exc:
        assert "\n" not in str(exc), str(exc)
    except Exception as exc:
        if not is_known_bug(exc, KNOWN_BUGS):
            raise
    assert _snapshot() == _EXPECTED, "the dry run wrote something"


def one_input(data: bytes) -> None:
    text = recipe_text(provider(data))
    check_recipe_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    from _common import run_atheris

    run_atheris(one_input)
