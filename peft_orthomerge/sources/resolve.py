"""Resolve a user reference (local path or Hugging Face Hub repo id) to a local directory."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

# What a merge needs from a Hub repo, by kind of input (``snapshot_download``'s ``allow_patterns``).
# Pickle files (``*.bin``) are fetched for checkpoints only when pickle loading is allowed.
PATTERNS: dict[str, tuple[str, ...]] = {
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"),
    "model": ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"),
    "config": ("*.json",),
    "any": ("*.json", "*.safetensors", "*.md"),
}
PICKLE_PATTERNS = ("*.bin",)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)


def looks_like_repo_id(ref: str) -> bool:
    """True for strings shaped like ``org/name`` (the Hub's rules) that contain no path traversal."""
    return bool(_REPO_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref


def _check_revision(revision: str | None, ref: str) -> None:
    """Refuse revisions that could address files outside the Hub cache (``..``, absolute, NUL)."""
    if revision is None:
        return
    parts = revision.replace("\\", "/").split("/")
    if revision.startswith("/") or "\x00" in revision or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"invalid revision {revision!r}", path=ref, hint="Use a branch, tag or commit hash.")


def resolve_source(
    ref: str | os.PathLike,
    *,
    kind: str | None = None,
    allow_pickle: bool = False,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Return a local directory holding ``ref``.

    A path that exists locally wins. Otherwise a string shaped like ``org/name`` is fetched with
    `huggingface_hub.snapshot_download` (which serves from the local cache, and only from it when
    ``HF_HUB_OFFLINE=1``), restricted to the files of ``kind`` (a key of `PATTERNS`; with
    ``allow_pickle`` a model's ``*.bin`` files too) or to explicit ``allow_patterns``. Anything
    else is an `InputError`.
    """
    if kind is not None:
        allow_patterns = [*PATTERNS[kind], *(PICKLE_PATTERNS if allow_pickle and kind == "model" else ())]
    try:
        path = Path(ref).expanduser()
    except RuntimeError as exc:  # "~user" for an unknown user
        raise InputError(f"invalid path ({exc})", path=str(ref)) from exc
    if path.exists():
        if not path.is_dir():
            raise InputError("expected a directory, found a file", path=path)
        return path.resolve()
    text = str(ref)
    if not looks_like_repo_id(text):
        raise InputError("no such directory, and not a Hugging Face Hub repo id", path=text)
    _check_revision(revision, text)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=text, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise InputError(
            f"not a local directory, and the Hub repo could not be fetched ({type(exc).__name__})",
            path=text,
            hint="Check the repo id, your network or HF_HUB_OFFLINE, and your access token.",
        ) from exc
    return Path(local)
