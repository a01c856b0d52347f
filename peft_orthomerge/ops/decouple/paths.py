"""Which driver decouples a weight: the one place the choice is made.

For a 2-D weight of torch shape ``(out, in)``:

- ``"euclidean"``: no target, no rotation: the residual method on the task vectors;
- ``"rows"``: task arithmetic with ``2 out >= in`` (square and tall: q/o, gate/up, embeddings,
  ``lm_head``): the row-block Gram path (`rows`), only ``in x in`` matrices;
- ``"reduced"``: task arithmetic (no parameter but ``lam``) with ``2 out < in`` (``down_proj``,
  GQA k/v): the reduced basis (`reduced`), never forming a residual;
- ``"dense"``: every other residual method: Procrustes per expert, residuals handed to the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PATHS = ("euclidean", "rows", "reduced", "dense")


def decoupling_path(
    shape: Sequence[int], target: str | None, residual: str, residual_kwargs: Mapping[str, Any] | None = None
) -> str:
    """The driver (one of `PATHS`) for a weight of torch shape ``(out, in)`` (module docstring)."""
    if target is None:
        return "euclidean"
    if residual != "ta":
        return "dense"
    out, inp = int(shape[0]), int(shape[1])
    if 2 * out >= inp:
        return "rows"
    return "reduced" if set(residual_kwargs or {}) <= {"lam"} else "dense"
