"""Task weights: validation and normalisation shared by every merge path."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Return ``n`` task weights summing to 1 (uniform when ``weights`` is ``None``).

    Raises `ConfigError` for a wrong length, negative, non-finite or all-zero weights.
    """
    if n < 1:
        raise ConfigError("no inputs to merge", hint="Pass at least one adapter or checkpoint.")
    if weights is None:
        return [1.0 / n] * n
    weights = list(weights)
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} inputs")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"weights must be numbers ({exc})") from exc
    if not all(math.isfinite(w) for w in values):
        raise ConfigError(f"weights must be finite, got {values}")
    if any(w < 0 for w in values):
        raise ConfigError(f"weights must be non-negative, got {values}")
    largest = max(values)
    if largest <= 0:
        raise ConfigError("weights sum to zero", hint="Give at least one input a positive weight.")
    values = [w / largest for w in values]  # no overflow for huge finite weights
    total = sum(values)
    if total <= 0:
        raise ConfigError("weights sum to zero", hint="Give at least one input a positive weight.")
    return [w / total for w in values]
