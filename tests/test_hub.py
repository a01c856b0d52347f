"""push_to_hub with a fake Hub client that records calls (no network)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from peft_orthomerge import hub
from peft_orthomerge.errors import ConfigError, OutputError
from peft_orthomerge.report import REPORT_FILE, MergeReport
from peft_orthomerge.sinks.card import write_model_card

TOKEN = "hf_secretTOKEN1234567890"


class FakeApi:
    calls: ClassVar[list] = []
    fail: Exception | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        FakeApi.calls.append(("create_repo", kwargs))
        if FakeApi.fail:
            raise FakeApi.fail

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Info()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    FakeApi.fail = None
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    return FakeApi


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    report = MergeReport(kind="oft", method="orthomerge", inputs=["a", "b"], weights=[0.5, 0.5], output_path=str(out))
    report.to_json(out / REPORT_FILE)
    write_model_card(out, report, library_name="peft")
    (out / "adapter_model.safetensors").write_bytes(b"x")
    return out


def test_push_creates_repo_and_uploads(fake_api, finished, capsys):
    url = hub.push_to_hub(finished, "me/merged", private=True, token=TOKEN, commit_message="msg")
    assert url == "https://huggingface.co/me/merged/commit/abc"
    names = [c[0] for c in fake_api.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert fake_api.calls[0][1] == {"token": TOKEN}
    assert fake_api.calls[1][1] == {"repo_id": "me/merged", "repo_type": "model", "private": True, "exist_ok": True}
    upload = fake_api.calls[2][1]
    assert upload["folder_path"] == str(finished.resolve()) and upload["repo_id"] == "me/merged"
    assert upload["commit_message"] == "msg" and ".*" in upload["ignore_patterns"]
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert all(TOKEN not in p.read_bytes().decode(errors="ignore") for p in finished.iterdir())


def test_default_is_public_and_token_from_environment(fake_api, finished):
    hub.push_to_hub(finished, "me/merged")
    assert fake_api.calls[0][1] == {"token": None}
    assert fake_api.calls[1][1]["private"] is False


@pytest.mark.parametrize("missing", ["README.md", REPORT_FILE])
def test_refuses_unfinished_output(fake_api, finished, missing):
    (finished / missing).unlink()
    with pytest.raises(OutputError, match="not a finished"):
        hub.push_to_hub(finished, "me/merged")
    assert fake_api.calls == []


def test_refuses_missing_dir_and_bad_repo_id(fake_api, tmp_path, finished):
    with pytest.raises(OutputError, match="not a directory"):
        hub.push_to_hub(tmp_path / "nope", "me/merged")
    for bad in ["no-namespace", "../x", "a/b/c", ""]:
        with pytest.raises(ConfigError, match="repo id"):
            hub.push_to_hub(finished, bad)
    assert fake_api.calls == []


def test_hub_failure_is_one_line_without_token(fake_api, finished):
    fake_api.fail = RuntimeError(f"401 Unauthorized for token {TOKEN}\nmore details")
    with pytest.raises(OutputError) as info:
        hub.push_to_hub(finished, "me/merged", token=TOKEN)
    text = str(info.value)
    assert TOKEN not in text and "***" in text and "\n" not in text and "me/merged" in text
    assert info.value.__cause__ is None
