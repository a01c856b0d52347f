"""Hostile input to the command line: every failure exits 2 with one line on stderr that is a
proper `OrthoMergeError` (not an "unexpected" crash), runs no code from the inputs, and writes
nothing. Complements tests/test_cli.py (the CLI helper's own error cases)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import peft_orthomerge
from peft_orthomerge import cli
from peft_orthomerge.errors import NumericalError
from peft_orthomerge.report import MergeReport

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _one_line_error(result, *fragments, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _proper_error(result, *fragments) -> str:
    """Exit 2, one line, and an OrthoMergeError rather than the CLI's catch-all for bugs."""
    line = _one_line_error(result, *fragments)
    assert "unexpected" not in line, line
    return line


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A directory with two plausible adapter directories (enough for planning; no merge runs)."""
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "oft_block_size": 4, "r": 0}))
        save_file({"base_model.model.layer.oft_R.weight": torch.zeros(2, 6)}, str(d / "adapter_model.safetensors"))
    return tmp_path


def _recipe(root: Path, text_or_data, name: str = "recipe.yaml") -> Path:
    path = root / name
    if isinstance(text_or_data, bytes):
        path.write_bytes(text_or_data)
    else:
        path.write_text(text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data))
    return path


def _oft(**overrides) -> dict:
    data = {"kind": "oft", "inputs": [{"path": "a"}, {"path": "b"}], "output": {"path": "merged"}}
    data.update(overrides)
    return data


# --------------------------------------------------------------------------------------------
# recipes that try to run code, exhaust memory or escape
# --------------------------------------------------------------------------------------------
def _payload_recipes(marker: Path) -> dict[str, str]:
    cmd = f"touch {marker}"
    return {
        "python-object-apply": f"kind: oft\ninputs: !!python/object/apply:os.system [{cmd!r}]\noutput: {{path: m}}\n",
        "python-name": "kind: !!python/name:os.system\ninputs: [{path: a}]\noutput: {path: m}\n",
        "python-object-new": f"!!python/object/new:subprocess.Popen [[sh, -c, {cmd!r}]]\n",
        "yaml-tag-module": "!!python/module:os\n",
    }


@pytest.mark.parametrize("case", sorted(_payload_recipes(Path("/x"))))
def test_yaml_code_execution_tags_are_refused(workdir, case):
    marker = workdir / "PWNED"
    recipe = _recipe(workdir, _payload_recipes(marker)[case])
    before = _tree(workdir)
    _proper_error(_run("merge", recipe), str(recipe))
    assert not marker.exists()
    assert _tree(workdir) == before


def test_yaml_payload_in_a_real_process(workdir):
    """The installed entry point, as a user runs it: exit 2, one stderr line, payload not run."""
    marker = workdir / "PWNED"
    recipe = _recipe(workdir, _payload_recipes(marker)["python-object-apply"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "peft_orthomerge", "merge", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not marker.exists() and not (workdir / "m").exists()


def test_billion_laughs_and_recursive_aliases_are_fast_errors(workdir):
    lines = ["kind: oft", "x0: &x0 [a, a, a, a, a, a, a, a, a]"]
    for i in range(1, 10):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]")
    laughs = "\n".join(lines) + "\ninputs: [{path: *x9}]\noutput: {path: m}\nmethod: {name: *x9}\n"
    for text in (
        laughs,
        "kind: oft\ninputs: &a [*a]\noutput: {path: m}\n",
        "&a [*a]\n",
        "kind: oft\ninputs:\n  - path: &p [*p]\noutput: {path: m}\n",
    ):
        start = time.perf_counter()
        _proper_error(_run("merge", _recipe(workdir, text)))
        assert time.perf_counter() - start < 20  # an exponential walk would not finish


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"", id="empty-file"),
        pytest.param(b"# only a comment\n", id="only-comment"),
        pytest.param(b"- kind: oft\n", id="a-list"),
        pytest.param(b"oft\n", id="a-scalar"),
        pytest.param(b"\xff\xfe\x00k\x00i\x00n\x00d", id="not-utf8"),
        pytest.param(b"kind: oft\n\tinputs: []\n", id="tab-indent"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: m}\n---\nkind: lora\n", id="two-documents"),
        pytest.param(b"kind: oft\ninputs: [{path: a, weight: .nan}]\noutput: {path: m}\n", id="nan-weight"),
        pytest.param(b"kind: oft\ninputs: [{path: a, weight: .inf}]\noutput: {path: m}\n", id="inf-weight"),
        pytest.param(b"kind: oft\ninputs: [{path: a, weight: -1}]\noutput: {path: m}\n", id="negative-weight"),
        pytest.param(
            b"kind: oft\ninputs: [{path: a, weight: 0}, {path: b, weight: 0}]\noutput: {path: m}\n", id="zero-weights"
        ),
        pytest.param(b"kind: oft\ninputs: [{path: a, weight: one}]\noutput: {path: m}\n", id="string-weight"),
        pytest.param(b"kind: oft\ninputs: [{path: a, weight: 1e999}]\noutput: {path: m}\n", id="overflowing-weight"),
        pytest.param(b"kind: oft\ninputs: []\noutput: {path: m}\n", id="no-inputs"),
        pytest.param(b"kind: oft\ninputs: [{path: ''}]\noutput: {path: m}\n", id="empty-input-path"),
        pytest.param(b"kind: oft\ninputs: [{path: 3}]\noutput: {path: m}\n", id="int-input-path"),
        pytest.param(b"kind: oft\ninputs: [a, b]\noutput: {path: m}\n", id="inputs-as-strings"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: m\n", id="output-as-string"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: m}\nmethod: {scale: .nan}\n", id="nan-scale"),
        pytest.param(
            b"kind: oft\ninputs: [{path: a}]\noutput: {path: m}\nmethod: orthomerge\n", id="method-as-string"
        ),
        pytest.param(b"kind: [oft]\ninputs: [{path: a}]\noutput: {path: m}\n", id="kind-as-list"),
        pytest.param(b"kind: OFT\ninputs: [{path: a}]\noutput: {path: m}\n", id="kind-upper-case"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: m}\nkind: lora\n", id="duplicate-key"),
        pytest.param(
            b"kind: full\nbase_model: a\ninputs: [{path: b}]\noutput: {path: m}\nmethod: {include: '(['}\n",
            id="bad-regex",
        ),
        pytest.param(b'kind: oft\ninputs: [{path: "a\\0b"}]\noutput: {path: m}\n', id="nul-in-path"),
        pytest.param(b'kind: oft\ninputs: [{path: a}]\noutput: {path: "m\\0x"}\n', id="nul-in-output"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: /tmp/elsewhere}\n", id="absolute-output"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: sub/../../escape}\n", id="dotdot-output"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: .}\n", id="output-is-recipe-dir"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: a}\n", id="output-is-an-input"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: a/merged}\n", id="output-inside-an-input"),
        pytest.param(b"kind: oft\ninputs: [{path: a}]\noutput: {path: recipe.yaml}\n", id="output-is-the-recipe-file"),
        pytest.param(b"kind: oft\ninputs: [{path: org/..}]\noutput: {path: m}\n", id="repo-id-dotdot"),
        pytest.param(b"kind: oft\ninputs: [{path: a/adapter_config.json}]\noutput: {path: m}\n", id="input-is-a-file"),
        pytest.param(
            b"kind: lora\nbase_model: no-org/no-base\ninputs: [{path: a}]\noutput: {path: m}\n", id="unreachable-base"
        ),
        pytest.param(
            b"kind: oft\ninputs: [{path: a}]\noutput: {path: m, format: folded}\nbase_model: /nonexistent/base\n",
            id="missing-base-dir",
        ),
    ],
)
def test_bad_recipe_exits_2_and_writes_nothing(workdir, monkeypatch, text):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workdir)
    recipe = _recipe(workdir, text)
    before = _tree(workdir)
    _proper_error(_run("merge", recipe))
    assert _tree(workdir) == before
    assert not Path("/tmp/elsewhere").exists() and not (workdir.parent / "escape").exists()


def test_recipe_path_is_a_directory(workdir):
    _proper_error(_run("merge", workdir / "a"))


def test_out_equal_to_an_input_via_the_command_line(workdir):
    recipe = _recipe(workdir, _oft())
    before = _tree(workdir)
    for out in (workdir / "a", workdir / "a" / "sub", workdir):
        _proper_error(_run("merge", recipe, "--out", out, "--overwrite"), "input")
    assert _tree(workdir) == before


def test_out_is_an_existing_file(workdir):
    recipe = _recipe(workdir, _oft())
    (workdir / "file").write_text("keep")
    _proper_error(_run("merge", recipe, "--out", workdir / "file", "--overwrite"))
    assert (workdir / "file").read_text() == "keep"


def test_out_not_writable(workdir, monkeypatch):
    recipe = _recipe(workdir, _oft())
    ro = workdir / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro else real(p, m, *a, **k))
    _proper_error(_run("merge", recipe, "--out", ro / "merged"), str(ro))
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("repo", ["org/..", "../x", "a/b/c", "org/na me", "/abs/x"])
def test_push_to_hub_repo_id_is_validated_before_work(workdir, repo, monkeypatch):
    recipe = _recipe(workdir, _oft())
    called = []
    monkeypatch.setattr(peft_orthomerge, "merge_oft_checkpoints", lambda *a, **k: called.append(1))
    _proper_error(_run("merge", recipe, "--push-to-hub", repo), "repo id")
    assert called == [] and not (workdir / "merged").exists()


# --------------------------------------------------------------------------------------------
# failures during the merge: interrupt, full disk, numerical error (merge function replaced)
# --------------------------------------------------------------------------------------------
def _failing_merge(exc: BaseException):
    """A stand-in for merge_oft_checkpoints that writes part of its output, then fails."""

    def merge(adapters, output_dir, weights=None, **kwargs):
        out = Path(output_dir)
        out.mkdir(parents=True)
        save_file({"half": torch.ones(3)}, str(out / "adapter_model.safetensors"))
        raise exc

    return merge


@pytest.mark.parametrize(
    "exc, code, fragment",
    [
        (KeyboardInterrupt(), 130, ""),
        (OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device"),
        (
            NumericalError("merged rotation is not finite\nsecond line", tensor="model.layers.0.q_proj"),
            2,
            "model.layers.0.q_proj",
        ),
    ],
)
def test_failure_mid_merge_leaves_no_output(workdir, monkeypatch, exc, code, fragment):
    monkeypatch.setattr(peft_orthomerge, "merge_oft_checkpoints", _failing_merge(exc))
    recipe = _recipe(workdir, _oft())
    before = _tree(workdir)
    line = _one_line_error(_run("merge", recipe), fragment, code=code)
    assert "unexpected" not in line
    assert _tree(workdir) == before  # inputs untouched, no output, no temporary directory


def test_ctrl_c_mid_merge_says_nothing_was_written(workdir, monkeypatch):
    monkeypatch.setattr(peft_orthomerge, "merge_oft_checkpoints", _failing_merge(KeyboardInterrupt()))
    result = _run("merge", _recipe(workdir, _oft()))
    assert result.exit_code == 130
    assert result.stderr.strip() == "error: interrupted; nothing was written"


def test_failure_mid_merge_with_overwrite_keeps_previous_output(workdir, monkeypatch):
    monkeypatch.setattr(peft_orthomerge, "merge_oft_checkpoints", _failing_merge(OSError(errno.ENOSPC, "disk full")))
    (workdir / "merged").mkdir()
    (workdir / "merged" / "previous.txt").write_text("previous result")
    recipe = _recipe(workdir, _oft())
    before = _tree(workdir)
    _proper_error(_run("merge", recipe, "--overwrite"), "disk full")
    assert _tree(workdir) == before


# --------------------------------------------------------------------------------------------
# inspect and report on hostile directories
# --------------------------------------------------------------------------------------------
def _adapter_dir(root: Path, name: str, config, weights: bytes | None = None) -> Path:
    d = root / name
    d.mkdir()
    if config is not None:
        (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return d


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("peft_type", ["OFT", "LORA"])
def test_inspect_never_unpickles(tmp_path, peft_type):
    marker = tmp_path / "PWNED"
    config = {"peft_type": peft_type, "oft_block_size": 4, "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}
    d = _adapter_dir(tmp_path, "pickled", config)
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"w": _Evil(marker)}, fh)
    _proper_error(_run("inspect", d), "pickle")
    assert not marker.exists()


@pytest.mark.parametrize(
    "config, weights",
    [
        pytest.param("{not json", None, id="adapter-config-invalid-json"),
        pytest.param("[1, 2]", None, id="adapter-config-a-list"),
        pytest.param("null", None, id="adapter-config-null"),
        pytest.param({"peft_type": "FOO"}, None, id="unknown-peft-type"),
        pytest.param({"peft_type": "OFT", "oft_block_size": 4}, b"", id="zero-byte-weights"),
        pytest.param(
            {"peft_type": "OFT", "oft_block_size": 4},
            b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage",
            id="corrupt-weights",
        ),
    ],
)
def test_inspect_hostile_adapter(tmp_path, config, weights):
    d = _adapter_dir(tmp_path, "bad", config, weights)
    before = _tree(tmp_path)
    _proper_error(_run("inspect", d), str(d))
    _proper_error(_run("inspect", "--json", d))
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("text", ["{not json", "[1]"])
def test_inspect_hostile_model_config(tmp_path, text):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(text)
    save_file({"w": torch.ones(2, 2)}, str(d / "model.safetensors"))
    _proper_error(_run("inspect", d), str(d))


@pytest.mark.parametrize("ref", ["org/..", "no-such-org/no-such-adapter", "/definitely/not/here"])
def test_inspect_bad_references(monkeypatch, ref):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _proper_error(_run("inspect", ref), ref)


def _fake_output(root: Path, report_text: str | None, config: str | None = None) -> Path:
    out = root / "out"
    out.mkdir()
    if report_text is not None:
        (out / "orthomerge_report.json").write_text(report_text)
    if config is not None:
        (out / "adapter_config.json").write_text(config)
    return out


@pytest.mark.parametrize(
    "report_text, config",
    [
        pytest.param(None, None, id="not-an-output"),
        pytest.param("{not json", None, id="report-invalid-json"),
        pytest.param("[]", None, id="report-a-list"),
        pytest.param('{"kind": 3, "modules": "x"}', None, id="report-wrong-types"),
        pytest.param("VALID", "{not json", id="adapter-config-invalid-json"),
    ],
)
def test_report_on_hostile_output_dirs(tmp_path, report_text, config):
    if report_text == "VALID":
        report_text = MergeReport(kind="oft", method="orthomerge", inputs=["a", "b"], weights=[0.5, 0.5]).to_json()
    out = _fake_output(tmp_path, report_text, config)
    before = _tree(tmp_path)
    _proper_error(_run("report", out, "--no-plots"))
    assert _tree(tmp_path) == before


# --------------------------------------------------------------------------------------------
# end to end through the real OFT merge
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from _cli_utils import build_oft_inputs

    return build_oft_inputs(tmp_path_factory.mktemp("hostile_cli_real"), n=2)


def _poisoned_copy(src: Path, dst: Path, value: float) -> tuple[Path, str]:
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("oft_R.weight"))[-1]
    tensors[key][0, 0] = value
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst, key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["adapter", "folded"])
def test_cli_non_finite_adapter_names_file_and_tensor(real, tmp_path, value, fmt):
    bad, key = _poisoned_copy(real["oft1"], tmp_path / "bad", value)
    data = {
        "kind": "oft",
        "base_model": str(real["base"]),
        "inputs": [{"path": str(real["oft0"])}, {"path": str(bad)}],
        "output": {"path": "merged", "format": fmt},
    }
    recipe = _recipe(tmp_path, data)
    before = _tree(tmp_path)
    _proper_error(_run("merge", recipe), str(bad), key)
    assert _tree(tmp_path) == before


def test_cli_lora_given_as_oft_points_to_the_lora_path(real, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(real["base"]), LoraConfig(r=2, target_modules=["q_proj"])
    )
    lora.save_pretrained(tmp_path / "lora")
    recipe = _recipe(
        tmp_path, {"kind": "oft", "inputs": [{"path": str(real["oft0"])}, {"path": "lora"}], "output": {"path": "m"}}
    )
    before = _tree(tmp_path)
    _proper_error(_run("merge", recipe), "lora", "merge_lora_adapters")
    assert _tree(tmp_path) == before


def test_cli_interrupt_in_the_real_merge_leaves_nothing(real, tmp_path, monkeypatch):
    import peft_orthomerge.merge.oft as plan_mod

    calls = []
    real_merge = plan_mod.merge_module

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(plan_mod, "merge_module", interrupt_second)
    recipe = _recipe(
        tmp_path,
        {"kind": "oft", "inputs": [{"path": str(real["oft0"])}, {"path": str(real["oft1"])}], "output": {"path": "m"}},
    )
    before_inputs = {k: _tree(real[k]) for k in ("oft0", "oft1")}
    before = _tree(tmp_path)
    result = _run("merge", recipe)
    assert result.exit_code == 130 and len(calls) == 2
    assert _tree(tmp_path) == before
    assert {k: _tree(real[k]) for k in ("oft0", "oft1")} == before_inputs


def test_remote_code_in_a_base_model_is_never_run(real, tmp_path, monkeypatch):
    """A base whose config asks for custom modeling code (auto_map + a .py that would create a
    marker): the lora merge loads it with trust_remote_code=False, so the code never runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil_base"
    evil.mkdir()
    config = json.loads((real["base"] / "config.json").read_text())
    config.update(
        model_type="evil_llama",
        architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    )
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    shutil.copy(real["base"] / "model.safetensors", evil / "model.safetensors")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(real["base"]), LoraConfig(r=2, target_modules=["q_proj"])
    )
    lora.save_pretrained(tmp_path / "lora")
    recipe = _recipe(
        tmp_path, {"kind": "lora", "base_model": "evil_base", "inputs": [{"path": "lora"}], "output": {"path": "m"}}
    )
    result = _run("merge", recipe)
    assert not marker.exists()
    _proper_error(result)
    assert not (tmp_path / "m").exists()


def test_no_trust_remote_code_anywhere_in_the_package():
    """Static guard: every mention of trust_remote_code in the library passes False."""
    import re

    offenders = []
    for file in sorted((REPO_ROOT / "peft_orthomerge").rglob("*.py")):
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            for match in re.finditer(r"trust_remote_code\s*=\s*([^,)\s]+)", line):
                if match.group(1) != "False":
                    offenders.append(f"{file.name}:{lineno}: {line.strip()}")
    assert offenders == []
