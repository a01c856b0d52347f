"""Bounded fuzzing of the adapter readers and the recipe parser (entries in fuzz/).

With atheris installed (the ``dev`` extra on Linux) each entry runs under libFuzzer in a
subprocess for a fixed time and seed; without it, the same entry function is driven by a
hypothesis byte strategy instead. Either way: nothing but `OrthoMergeError` may escape.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = REPO_ROOT / "fuzz"
SECONDS = int(os.environ.get("ORTHOMERGE_FUZZ_SECONDS", "10"))
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


def _run_atheris(entry: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(FUZZ_DIR / entry),
        f"-max_total_time={SECONDS}",
        "-seed=12345",
        "-rss_limit_mb=4096",
        "-timeout=30",
        f"-artifact_prefix={tmp_path}/",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SECONDS + 180, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, f"fuzzer found a crash ({crashes}):\n{output[-6000:]}"
    assert "Uncaught Python exception" not in output
    done = [line for line in output.splitlines() if line.startswith("Done ")]
    assert done and int(done[-1].split()[1]) > 0, output[-2000:]
    return done[-1]


def _load_entry(name: str):
    spec = importlib.util.spec_from_file_location(name, FUZZ_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(FUZZ_DIR))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FUZZ_DIR))
    return module


def _run_hypothesis(name: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    module = _load_entry(name)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(max_size=2048))
    def run(data):
        module.one_input(data)

    run()


@pytest.mark.parametrize("entry", ["fuzz_adapter_reader", "fuzz_recipe"])
def test_fuzz_entry_finds_no_crash(entry, tmp_path):
    if HAVE_ATHERIS:
        print(_run_atheris(f"{entry}.py", tmp_path))
    else:  # fallback: the same entry under hypothesis
        _run_hypothesis(entry)


@pytest.mark.parametrize("entry", ["fuzz_adapter_reader", "fuzz_recipe"])
def test_fuzz_entry_runs_under_hypothesis_too(entry, monkeypatch):
    """The fallback path must keep working where atheris is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_atheris(name, *args, **kwargs):
        if name == "atheris":
            raise ImportError("atheris hidden for this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_atheris)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = _load_entry(entry)
    assert module.atheris is None
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(max_size=1024))
    def run(data):
        module.one_input(data)

    run()
