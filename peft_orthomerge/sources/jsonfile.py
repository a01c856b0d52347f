"""Reading the JSON config files that come with adapters and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_json_object(file: str | Path, *, what: str = "config") -> dict[str, Any]:
    """Parse ``file`` as a JSON object; `InputError` naming the file if it is missing, invalid or not an object."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{what} file not found", path=file) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"invalid {what} JSON ({exc})", path=file) from exc
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", path=file)
    return data
