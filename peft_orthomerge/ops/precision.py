"""Whether float32 is accurate enough to decouple a weight (``precision="float32"``).

A float32 polar factor of ``M = W0^T W_i`` carries an error that grows with the conditioning of
``W0`` (``M`` is about ``W0^T W0``, whose condition number is ``kappa(W0)^2``). Measured against the
float64 merge (3 to 5 experts, task arithmetic; the relative Frobenius error of the merged weight;
``eps`` is float32's machine epsilon, 1.19e-7):

| weight | ``kappa(W0)`` | error | error / (``eps kappa(W0)``) |
|---|---|---|---|
| the decoupling benchmark's synthetic weights (singular values over 1.5 decades) | 31.6 | 2.5e-6 | 0.66 |
| SmolLM2-135M-Instruct, layer 0 ``gate_proj`` | 18.8 | 8.0e-7 | 0.36 |
| SmolLM2-135M-Instruct, layer 0 ``o_proj`` | 4.4e4 | 9.3e-3 | 1.8 |
| SmolLM2-135M-Instruct, layer 0 ``q_proj`` | 5.1e4 | 2.1e-2 | 3.5 |

In the last two ``kappa(M)`` (2e8, 1e9) is beyond float32's resolution: its rank rule treats
directions the float64 factor keeps as a null space, and the rotation differs there by O(1).
`float32_error_estimate` is ``ERROR_FACTOR eps kappa(W0)`` with ``ERROR_FACTOR = 4`` (above every
ratio measured); a weight is decoupled in float32 where the estimate is at most `FLOAT32_TOL`
(1e-4: ``kappa(W0)`` up to about 210), in float64 elsewhere (`decoupling_dtype`). It is an estimate
calibrated on these weights, not a proven bound. ``kappa(W0)`` is the ratio of the extreme
nonzero singular values (``out < in``: of the ``out`` of them), from the eigenvalues of the
smaller Gram matrix in float64 (``inf`` for a singular ``W0``); on the row-block path that costs one
more pass over the base's rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decouple.rows import RowSource, block_rows

ERROR_FACTOR = 4.0
FLOAT32_TOL = 1e-4


def gram_condition(gram: torch.Tensor) -> float:
    """``sqrt(lambda_max / lambda_min)`` of a symmetric positive semi-definite Gram matrix (``inf``
    when ``lambda_min <= 0``, or when the eigensolver does not converge)."""
    try:
        lam = torch.linalg.eigvalsh(gram)
    except torch.linalg.LinAlgError:
        return float("inf")
    low, high = float(lam[0]), float(lam[-1])
    return (high / low) ** 0.5 if low > 0 else float("inf")


def base_condition(w0: torch.Tensor) -> float:
    """``kappa(W0)`` of a weight ``(out, in)`` in memory, from its smaller Gram matrix in float64."""
    w = w0.to(torch.float64)
    return gram_condition(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T)


def rows_condition(base: RowSource) -> float:
    """``kappa(W0)`` of a weight read by blocks of rows (``out >= in``): ``W0^T W0`` summed in float64."""
    out, n = base.shape
    step = block_rows(n, torch.finfo(torch.float64).bits // 8, None)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, out, step):
        block = base.rows(start, min(start + step, out)).to(device="cpu", dtype=torch.float64)
        gram.addmm_(block.T, block)
    return gram_condition(gram)


def float32_error_estimate(kappa: float) -> float:
    """The estimated relative error of a float32 decoupling of a weight with ``kappa(W0) = kappa``."""
    return ERROR_FACTOR * torch.finfo(torch.float32).eps * kappa


def decoupling_dtype(requested: torch.dtype, kappa: Callable[[], float] | None) -> tuple[torch.dtype, float | None]:
    """The dtype to decouple a weight in and the float32 error estimate it was chosen by: float32
    only where `float32_error_estimate` of ``kappa()`` is at most `FLOAT32_TOL`, else float64;
    ``requested`` unchanged (and no estimate) unless it is float32 and ``kappa`` is given (a
    decoupled 2-D weight)."""
    if requested != torch.float32 or kappa is None:
        return requested, None
    estimate = float32_error_estimate(kappa())
    return (torch.float32 if estimate <= FLOAT32_TOL else torch.float64), estimate
