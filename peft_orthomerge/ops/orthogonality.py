"""Orthogonality errors ``||X^T X - I||_F``: per matrix of a batch, their maximum, or a probe estimate.

The measure is on the input side of the torch layout used everywhere in `ops`: a rotation ``P``
(``in x in``, or a batch ``(..., b, b)`` of blocks) acts as ``W @ P``, and orthogonality means
``P^T P = I``. Three variants, named by what they return:

- `orthogonality_errors`: a tensor, one error per matrix of the batch (exact, one Gram product each).
- `max_orthogonality_error`: a float, the largest error over the batch (0.0 for an empty batch).
- `probe_orthogonality_error`: a float, an unbiased estimate from a few seeded random probes
  (``m x probes`` products instead of ``m x m``), for the large matrices of the decoupling path.
"""

from __future__ import annotations

import torch


def orthogonality_errors(x: torch.Tensor) -> torch.Tensor:
    """``||X^T X - I||_F`` per matrix of the batch ``x`` (``(..., n, n)``), as a tensor of shape ``x.shape[:-2]``.

    Computed in ``x``'s floating dtype when it is float32 or float64 (float32 input: float32
    rounding, as in PEFT's own float32 forward); other dtypes are widened to float64 first.
    """
    x = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(x.transpose(-2, -1) @ x - eye)


def max_orthogonality_error(x: torch.Tensor) -> float:
    """``max_k ||X_k^T X_k - I||_F`` over the leading batch dimension of ``x`` (``(r, n, n)``) as a float;
    0.0 for an empty batch. See `orthogonality_errors`."""
    if x.shape[0] == 0:
        return 0.0
    return float(orthogonality_errors(x).max())


def probe_orthogonality_error(x: torch.Tensor, probes: int = 8) -> float:
    """Estimate of ``||X^T X - I||_F`` of one square ``x`` from random probes (``E ||E p||^2 = ||E||_F^2``), seeded."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    p = torch.randn(x.shape[-1], probes, generator=gen, dtype=x.dtype, device=x.device)
    return float(torch.linalg.matrix_norm(x.T @ (x @ p) - p)) / probes**0.5
