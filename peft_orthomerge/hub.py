"""Publish a finished output directory to the Hugging Face Hub.

Only directories that this library finished writing are pushed: they hold a model card
(``README.md``) and a merge report (``orthomerge_report.json``). The token is passed to
`huggingface_hub.HfApi` and never printed, logged or written into the output.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi

from .errors import ConfigError, OutputError
from .report import REPORT_FILE
from .sources.resolve import looks_like_repo_id

# Never uploaded: hidden files (temporary directories, editor and OS files) and caches.
IGNORE_PATTERNS = [".*", "**/.*", "__pycache__/*", "**/__pycache__/*"]


def check_publishable(output_dir: str | os.PathLike) -> Path:
    """Return ``output_dir`` resolved if it is a finished output, else raise `OutputError`."""
    path = Path(output_dir).expanduser()
    if not path.is_dir():
        raise OutputError("nothing to push: not a directory", path=path)
    missing = [name for name in ("README.md", REPORT_FILE) if not (path / name).is_file()]
    if missing:
        raise OutputError(
            f"not a finished peft-orthomerge output (missing {', '.join(missing)})",
            path=path,
            hint="Push the directory a merge wrote, after it completed.",
        )
    return path.resolve()


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (model repo) and upload the finished ``output_dir``; return the commit URL.

    ``token`` defaults to the one huggingface_hub finds (``HF_TOKEN`` or the cached login).
    ``private`` applies when the repo is created; an existing repo keeps its visibility.
    """
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise ConfigError(f"invalid Hub repo id {repo_id!r}; expected 'namespace/name'")
    folder = check_publishable(output_dir)
    api = HfApi(token=token)
    message = commit_message or f"Upload merge from peft-orthomerge ({folder.name})"
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as exc:  # HTTP, auth and network errors of huggingface_hub
        detail = str(exc).splitlines()[0] if str(exc) else ""
        if token:
            detail = detail.replace(token, "***")
        raise OutputError(
            f"pushing to the Hub failed ({type(exc).__name__}: {detail})",
            path=repo_id,
            hint="Check your network, `hf auth login` / HF_TOKEN, and write access to the repo.",
        ) from None
    return str(getattr(info, "commit_url", None) or info)
