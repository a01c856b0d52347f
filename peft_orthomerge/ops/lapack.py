"""The SVD and symmetric eigendecomposition every merge uses: torch's, retried in float64 where they fail.

LAPACK's divide-and-conquer drivers (``gesdd``, ``syevd``: torch's CPU defaults) can fail to
converge on a float32 matrix with many nearly equal singular values. Merging meets such matrices
all the time: ``U_2^T V_2`` for the orthogonal complements of a base and an expert close to it is
a block of an orthogonal matrix whose singular values cluster at 1 (measured: a 512 x 512 one with
112 of them within 1e-4 of 1 fails in float32 with oneMKL, every time, and converges in float64).
Without the retry, such a merge would end in torch's bare ``LinAlgError``. The eigensolver has not
been seen failing here; a failure would end the same way, so it gets the same retry.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..errors import NumericalError


def svd(x: torch.Tensor, *, full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(x, full_matrices=...)`` (``x = U diag(S) V^H``, batched over leading
    dimensions); where it does not converge, the SVD of ``x`` in float64, its factors returned in
    ``x``'s dtype (as accurate as ``x``'s dtype allows, or more). `NumericalError` when float64 does
    not converge either (no tensor named: the caller knows which one it was working on)."""
    return _retried_in_float64(
        partial(torch.linalg.svd, full_matrices=full_matrices), x, "singular value decomposition"
    )


def eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(x)`` (eigenvalues ascending, eigenvectors in the columns), retried in
    float64 as `svd` is; `NumericalError` when float64 does not converge either."""
    return _retried_in_float64(torch.linalg.eigh, x, "eigendecomposition")


def _retried_in_float64(decompose: Callable, x: torch.Tensor, what: str) -> tuple[torch.Tensor, ...]:
    try:
        return decompose(x)
    except torch.linalg.LinAlgError as exc:
        failure = exc
    if x.dtype != torch.float64:
        try:
            return tuple(t.to(x.dtype) for t in decompose(x.to(torch.float64)))
        except torch.linalg.LinAlgError as exc:
            failure = exc
    raise NumericalError(
        f"the {what} of a {tuple(x.shape)} matrix did not converge, even in float64 ({failure})",
        hint="check the base and expert weights for extreme values",
    ) from failure
