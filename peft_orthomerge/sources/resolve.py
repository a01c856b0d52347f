"""Resolve a user reference (local path or Hugging Face Hub repo id) to a local directory.

A Hub reference is ``org/name`` or ``org/name@revision`` (a branch, tag or commit hash; the part
after the last ``@``). Every Hub download goes through `resolve_source`, which records the commit
hash each reference resolved to (`resolved_revision`), read by the report, the model card and the
written recipe so that a merge names exactly what it read.
"""

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
_COMMIT = re.compile(r"[0-9a-f]{40}")
_RESOLVED: dict[str, str] = {}  # Hub reference as given -> commit hash it resolved to (this process)


def looks_like_repo_id(ref: str) -> bool:
    """True for strings shaped like ``org/name`` (the Hub's rules) that contain no path traversal."""
    return bool(_REPO_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref


def split_revision(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; a reference without ``@`` -> ``(ref, None)``."""
    repo, at, revision = ref.rpartition("@")
    return (repo, revision) if at else (ref, None)


def looks_like_hub_ref(ref: str) -> bool:
    """True for ``org/name`` or ``org/name@revision`` (repo id as `looks_like_repo_id`, revision non-empty)."""
    repo, revision = split_revision(ref)
    return looks_like_repo_id(repo) and revision != ""


def resolved_revision(ref: str) -> str | None:
    """The commit hash the Hub reference ``ref`` resolved to in this process, or ``None`` (a local
    path, a reference not downloaded yet, or a download whose folder does not name its commit)."""
    return _RESOLVED.get(str(ref))


def pinned(ref: str) -> str:
    """``ref`` with its revision replaced by the commit hash it resolved to (``ref`` when unknown)."""
    commit = resolved_revision(ref)
    return ref if commit is None else f"{split_revision(ref)[0]}@{commit}"


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

    A path that exists locally wins. Otherwise a string shaped like ``org/name`` or
    ``org/name@revision`` is fetched with `huggingface_hub.snapshot_download` at that revision (or
    ``revision``; both given must agree), which serves from the local cache, and only from it when
    ``HF_HUB_OFFLINE=1``, restricted to the files of ``kind`` (a key of `PATTERNS`; with
    ``allow_pickle`` a model's ``*.bin`` files too) or to explicit ``allow_patterns``. The commit
    hash it resolved to (the snapshot folder's name in the Hub cache) is recorded for
    `resolved_revision`. Anything else is an `InputError`.
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
    if not looks_like_hub_ref(text):
        raise InputError(
            "no such directory, and not a Hugging Face Hub repo id (org/name or org/name@revision)", path=text
        )
    repo, given = split_revision(text)
    if given is not None and revision is not None and given != revision:
        raise InputError(f"two revisions given ({given!r} in the id, {revision!r} as revision=)", path=text)
    revision = given if given is not None else revision
    _check_revision(revision, text)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=repo, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise InputError(
            f"not a local directory, and the Hub repo could not be fetched ({type(exc).__name__})",
            path=text,
            hint="Check the repo id and revision, your network or HF_HUB_OFFLINE, and your access token.",
        ) from exc
    local = Path(local)
    if _COMMIT.fullmatch(local.name):
        _RESOLVED[text] = local.name
    return local
