"""Which driver decouples a weight: the one place the choice is made.

For a 2-D weight of torch shape ``(out, in)``:

- ``"euclidean"``: no target, no rotation: the residual method on the task vectors;
- ``"rows"``: task arithmetic with ``out >= in`` (square and tall: q/o, gate/up, embeddings,
  ``lm_head``): the row-block Gram path (`rows`), only ``in x in`` matrices;
- ``"reduced"``: task arithmetic (no parameter but ``lam``) with ``2 out <= in`` (``down_proj``,
  GQA k/v): the reduced basis (`reduced`), never forming a residual; at ``2 out = in`` (GQA 2:1,
  an embedding of half the hidden size) its core is no larger than ``in x in`` and its factored
  form is still the cheaper one (512 x 1024, 5 experts: 1.48 -> 1.22 s in float64, 0.85 -> 0.68 s
  in float32 against the dense driver, same result to 5e-14);
- ``"dense"``: every other residual method: Procrustes per expert, residuals handed to the method;
  and task arithmetic with ``in / 2 < out < in``: there ``M = W0^T T_i`` is rank-deficient, so
  the rows driver would need a full ``in x in`` SVD per expert (the certified ``eigh`` route needs
  full rank), where the dense driver's thin form takes two ``out x out`` SVDs and one of the
  complement (1.7x faster than the rows driver at 512 x 1024, 5 experts, float64, same result to
  5e-15), and its tensors are no larger than the rows driver's ``N + 1`` Gram matrices of ``in x in``;
  and every weight for which an expert brings its own rotation (an OFT adapter, `given`), whatever
  the method: its generator is block-diagonal, not in the span of the rows of ``W0`` and ``W_i``
  that the ``rows`` and ``reduced`` drivers work in, so those drivers would be wrong for it. The
  dense driver sums every generator as a dense ``in x in`` skew matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PATHS = ("euclidean", "rows", "reduced", "dense")


def decoupling_path(
    shape: Sequence[int],
    target: str | None,
    residual: str,
    residual_kwargs: Mapping[str, Any] | None = None,
    *,
    given: bool = False,
) -> str:
    """The driver (one of `PATHS`) for a weight of torch shape ``(out, in)`` (module docstring);
    ``given``: some expert brings its own rotation for this weight."""
    if target is None:
        return "euclidean"
    if given or residual != "ta":
        return "dense"
    out, inp = int(shape[0]), int(shape[1])
    if out >= inp:
        return "rows"
    if 2 * out > inp:
        return "dense"
    return "reduced" if set(residual_kwargs or {}) <= {"lam"} else "dense"
