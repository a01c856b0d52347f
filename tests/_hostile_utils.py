"""Helpers shared by the hostile-input tests: copying and corrupting adapters, checking errors and outputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from peft_orthomerge.errors import OrthoMergeError


def rewrite(src: Path, dst: Path, fn, file: str = "adapter_model.safetensors") -> Path:
    """Copy ``src`` to ``dst`` with the tensors of ``file`` transformed by ``fn(dict) -> dict``."""
    shutil.copytree(src, dst)
    save_file(fn(load_file(dst / file)), str(dst / file))
    return dst


def edit_config(src: Path, dst: Path, fn) -> Path:
    """Copy adapter ``src`` to ``dst`` with its ``adapter_config.json`` transformed by ``fn(dict) -> dict``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(fn(cfg)))
    return dst


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_names(exc: OrthoMergeError, *parts: str) -> None:
    """The error is one line and names every part (file, tensor, ...)."""
    text = str(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text, (part, text)


def assert_nothing_written(out: Path) -> None:
    """No output directory and no temporary sibling of it."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


class _Payload:
    """Unpickling this runs ``touch marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_only_copy(src: Path, dst: Path, marker: Path) -> Path:
    """Copy adapter ``src`` to ``dst`` with its weights as ``adapter_model.bin`` holding a code-running payload."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    (dst / "adapter_model.safetensors").unlink()
    with open(dst / "adapter_model.bin", "wb") as fh:
        pickle.dump({**tensors, "x": _Payload(marker)}, fh)
    return dst
