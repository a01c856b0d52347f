"""Hub ids with revisions (``org/name@revision``): download arguments and the commit recorded in the
report, the model card and the written recipe. No network: huggingface_hub's ``snapshot_download``
is replaced by a function serving local copies from folders named by a fake commit hash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import build_tiny_llama

from peft_orthomerge.errors import InputError
from peft_orthomerge.recipe import RECIPE_FILE, load_recipe, parse_recipe, run_recipe
from peft_orthomerge.sources.resolve import looks_like_hub_ref, resolve_source, resolved_revision, split_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """``org/<name>`` served from ``hub/<name>/snapshots/<COMMIT>``; the calls are recorded."""
    import huggingface_hub

    hub = tmp_path / "hub"
    build_tiny_llama().save_pretrained(hub / "src" / "base")
    for seed in (1, 2):
        model = build_tiny_llama()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(hub / "src" / f"e{seed}")
    calls = []

    def snapshot_download(*, repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        name = repo_id.split("/")[1]
        target = hub / name / "snapshots" / COMMIT
        if not target.exists():
            shutil.copytree(hub / "src" / name, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_split_and_shape():
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert split_revision("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert split_revision("org/name") == ("org/name", None)
    assert looks_like_hub_ref("org/name@main") and looks_like_hub_ref("org/name")
    assert not looks_like_hub_ref("org/name@") and not looks_like_hub_ref("org/../x@main")


def test_resolve_passes_revision_and_records_commit(fake_hub):
    path = resolve_source("org/base@v1", kind="config")
    assert path.name == COMMIT and fake_hub == [("org/base", "v1")]
    assert resolved_revision("org/base@v1") == COMMIT


def test_bad_revisions_are_refused_before_the_hub(fake_hub):
    for ref in ("org/base@../../etc", "org/base@/abs"):
        with pytest.raises(InputError):
            resolve_source(ref)
    with pytest.raises(InputError, match="two revisions"):
        resolve_source("org/base@v1", revision="v2")
    assert fake_hub == []


def test_recipe_records_commits_in_report_card_and_recipe(fake_hub, tmp_path):
    recipe = parse_recipe(
        {
            "kind": "full",
            "base_model": "org/base@main",
            "inputs": [{"path": "org/e1@v2"}, {"path": "org/e2"}],
            "output": {"path": "out"},
        },
        base_dir=tmp_path,
    )
    run_recipe(recipe, quiet=True)
    out = tmp_path / "out"
    assert ("org/base", "main") in fake_hub and ("org/e1", "v2") in fake_hub and ("org/e2", None) in fake_hub
    report = json.loads((out / "orthomerge_report.json").read_text())
    assert report["revisions"] == {"org/e1@v2": COMMIT, "org/e2": COMMIT, "org/base@main": COMMIT}
    card = (out / "README.md").read_text()
    assert f"`{COMMIT}`" in card and "base_model: org/base\n" in card
    written = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert written["base_model"] == f"org/base@{COMMIT}"
    assert [i["path"] for i in written["inputs"]] == [f"org/e1@{COMMIT}", f"org/e2@{COMMIT}"]
    assert load_recipe(out / RECIPE_FILE).base_model == f"org/base@{COMMIT}"  # the pinned recipe is valid
