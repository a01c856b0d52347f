"""Karcher (Riemannian, Frechet) mean of block rotations on SO(b), batched over blocks.

Metric: the bi-invariant metric of SO(b), ``d(R, S) = ||log(R^T S)||_F`` (for a rotation with
planar angles ``theta_j`` this is ``sqrt(2 sum_j theta_j^2)``). For rotations ``R_i`` with weights
``w_i`` (summing to 1) the weighted Karcher mean ``M`` minimises ``sum_i w_i d(M, R_i)^2`` and is
characterised by ``sum_i w_i log(M^T R_i) = 0``. It is computed per block by the fixed-point
iteration::

    M_0 = exp(sum_i w_i log R_i)                      # log-Euclidean mean as the start
    G   = sum_i w_i log(M^T R_i);   M <- M exp(G)     # until max over blocks ||G||_F < tol

The result is bi-invariant: ``mean(G R_i H) = G mean(R_i) H`` for rotations ``G, H``. It is the
unique mean when the rotations lie in a geodesic ball of radius pi/2 (OFT rotations, close to the
identity, always do). Which side a rotation multiplies plays no role here: the mean of the
transposes is the transpose of the mean, so the same function serves PEFT's ``x_blk @ R_k``.

Logarithm. `log_so` is the principal logarithm, defined for rotations whose planar angles are all
below pi (no eigenvalue -1). With ``S = (R + R^T)/2`` and ``K = (R - R^T)/2`` (which commute, and
equal ``cos(Theta)`` and ``sin(Theta) J`` on each invariant plane) it returns
``log R = K h(S)`` with ``h(c) = arccos(c) / sqrt(1 - c^2)``, the matrix function ``h(S)`` taken by
`torch.linalg.eigh` of the symmetric ``S``. A matrix function of a symmetric matrix does not
depend on the eigenvector basis, so repeated angles (including the identity) are harmless; ``h`` is
smooth at ``c = 1`` (series there) and blows up only at ``c = -1`` (angle pi), which is refused.
`exp_so` is `torch.linalg.matrix_exp`.

All computations run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError, IncompatibleInputsError, NumericalError
from .finite import all_finite
from .lapack import eigh
from .weights import normalize_weights

_ZERO_FACTOR = 10.0  # magnitude correction: logs below _ZERO_FACTOR * tol count as zero
_SERIES_BELOW = 1e-5  # 1 - cos below this: second-order series of h (error < 1e-16)


def angle_over_sin(cos: torch.Tensor) -> torch.Tensor:
    """Elementwise ``theta / sin(theta)`` for ``theta = arccos(cos)`` (1 at ``cos = 1``).

    ``cos`` is clamped to ``[-1, 1]``; the value is ``inf`` at ``cos = -1``. Near ``cos = 1``, with
    ``t = 1 - cos``, the series ``1 + t/3 + 2 t^2 / 15`` is used; elsewhere the direct formula with
    ``sin(theta) = sqrt((1 - cos)(1 + cos))``.
    """
    c = cos.clamp(-1.0, 1.0)
    t = 1.0 - c
    series = 1.0 + t / 3.0 + (2.0 / 15.0) * t * t
    direct = torch.acos(c) / torch.sqrt(t * (1.0 + c))
    return torch.where(t < _SERIES_BELOW, series, direct)


def _check_square(x: torch.Tensor, what: str) -> None:
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise IncompatibleInputsError(f"{what} must have shape (..., b, b), got {tuple(x.shape)}")
    if not all_finite(x):
        raise NumericalError(f"non-finite values (NaN or Inf) in the {what}")


def log_so(R: torch.Tensor, *, angle_tol: float = 1e-6, orth_tol: float = 1e-6) -> torch.Tensor:
    """Principal matrix logarithm of rotations ``R`` of shape ``(..., b, b)``; returns skew float64.

    Domain: ``R`` orthogonal (``||R^T R - I||_F <= orth_tol``) with all planar angles below
    ``pi - angle_tol`` (in particular ``det R = +1``). On it, ``log_so(exp_so(A)) = A`` for every
    skew ``A`` whose spectral radius is below ``pi - angle_tol``.

    Raises:
        NumericalError: ``R`` is not orthogonal, has a reflection (det -1) or a rotation angle at
            pi (within ``angle_tol``), where the logarithm is not unique; the message gives the
            flat index of the first offending block.
    """
    _check_square(R, "rotation matrices")
    R = R.to(torch.float64)
    b = R.shape[-1]
    eye = torch.eye(b, dtype=R.dtype, device=R.device)
    orth = torch.linalg.matrix_norm(R.mT @ R - eye).reshape(-1)
    if orth.numel() and float(orth.max()) > orth_tol:
        idx = int(orth.argmax())
        raise NumericalError(
            f"block {idx} is not orthogonal (||R^T R - I||_F = {float(orth[idx]):.3g} > {orth_tol:g}): no rotation logarithm"
        )
    sym = (R + R.mT) / 2
    skew = (R - R.mT) / 2
    cos, vecs = eigh(sym)
    angles = torch.acos(cos.clamp(-1.0, 1.0))
    worst = angles.amax(dim=-1).reshape(-1)
    if worst.numel() and float(worst.max()) > math.pi - angle_tol:
        idx = int(worst.argmax())
        raise NumericalError(
            f"block {idx} has a rotation angle of pi (within {angle_tol:g} rad) or is a reflection (det -1): "
            "its logarithm is not unique"
        )
    h = (vecs * angle_over_sin(cos).unsqueeze(-2)) @ vecs.mT
    log = skew @ h
    return (log - log.mT) / 2


def exp_so(A: torch.Tensor) -> torch.Tensor:
    """Matrix exponential of skew matrices ``A`` of shape ``(..., b, b)``: a rotation (float64)."""
    _check_square(A, "skew matrices")
    return torch.linalg.matrix_exp(A.to(torch.float64))


def _weights_tensor(weights: Sequence[float] | torch.Tensor | None, n: int, batch_ndim: int) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    w = torch.tensor(normalize_weights(weights, n), dtype=torch.float64)
    return w.reshape(n, *([1] * batch_ndim))


def karcher_mean(
    rotations: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> torch.Tensor:
    """Weighted Karcher mean of rotations, per block.

    Args:
        rotations: ``(N, ..., b, b)``: ``N`` experts, any batch of blocks (typically ``(N, k, b, b)``).
        weights: ``N`` task weights (uniform when ``None``), normalised to sum to 1.
        tol: stop when the largest ``||sum_i w_i log(M^T R_i)||_F`` over the blocks is below it.
        max_iter: bound on the number of iterations.

    Returns:
        ``(..., b, b)`` float64 rotations ``M`` with ``sum_i w_i log(M^T R_i) = 0`` per block.

    Raises:
        NumericalError: an input is not a rotation in the domain of `log_so`, an input is at angle
            pi from the current estimate (rotations too far apart for a unique mean), or no
            convergence within ``max_iter`` steps.
    """
    if not tol > 0 or max_iter < 1:
        raise ConfigError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    _check_square(rotations, "rotation matrices")
    if rotations.ndim < 3:
        raise IncompatibleInputsError(f"rotations must have shape (N, ..., b, b), got {tuple(rotations.shape)}")
    R = rotations.to(torch.float64)
    w = _weights_tensor(weights, R.shape[0], R.ndim - 1).to(R.device)
    M = exp_so((w * log_so(R)).sum(dim=0))
    residual = math.inf
    for _ in range(max_iter):
        try:
            G = (w * log_so(M.mT @ R)).sum(dim=0)
        except NumericalError as exc:
            raise NumericalError(
                f"rotations too far apart for a unique Karcher mean ({exc.message})",
                hint="Rotations within a geodesic ball of radius pi/2 have a unique mean.",
            ) from exc
        residual = float(torch.linalg.matrix_norm(G).max())
        if residual < tol:
            return M
        M = M @ exp_so(G)
    raise NumericalError(
        f"Karcher mean did not converge in {max_iter} iterations (residual {residual:.3g}, tol {tol:g})",
        hint="Raise max_iter or tol.",
    )


def karcher_merge_skew(
    skews_log: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    magnitude_correction: bool = False,
    granularity: str = "module",
    tol: float = 1e-12,
    max_iter: int = 100,
    angle_tol: float = 1e-6,
) -> torch.Tensor:
    """Karcher mean in matrix-log coordinates: ``log(karcher_mean(exp(A_i)))``.

    Args:
        skews_log: ``(N, ..., b, b)`` skew matrices ``A_i = log R_i`` (principal logarithms: every
            planar angle below ``pi - angle_tol``; checked). Typically ``(N, k, b, b)``: the ``k``
            blocks of one module.
        weights: ``N`` task weights (uniform when ``None``), normalised to sum to 1.
        magnitude_correction: rescale the result ``L`` so that its Frobenius norm is the weighted
            mean of the input norms, ``L * (sum_i w_i ||A_i||) / ||L||`` (as in DESIGN section 3,
            with the Karcher mean in place of the arithmetic mean). An ``L`` within the mean's
            accuracy of zero (norm <= 10 tol per block, sqrt(k) 10 tol per module of k blocks:
            all inputs zero, or cancelling rotations) has no reliable direction: the result is
            zero there, never amplified rounding noise or NaN.
            The corrected angles may exceed pi; they are returned as they are.
        granularity: ``"module"`` (norms over all blocks together, the default) or ``"block"``
            (norms per block).
        tol, max_iter: passed to `karcher_mean`.

    Returns:
        ``(..., b, b)`` float64 skew matrix.
    """
    if granularity not in ("module", "block"):
        raise ConfigError(f"granularity must be 'module' or 'block', got {granularity!r}")
    _check_square(skews_log, "skew matrices")
    A = skews_log.to(torch.float64)
    if A.ndim < 3:
        raise IncompatibleInputsError(f"skew matrices must have shape (N, ..., b, b), got {tuple(A.shape)}")
    if A.numel() and float((A + A.mT).abs().max()) > 1e-12 * max(1.0, float(A.abs().max())):
        raise NumericalError("input matrices are not skew-symmetric")
    spectral = torch.linalg.eigvalsh(-(A @ A)).amax(dim=-1).clamp(min=0).sqrt()  # largest planar angle
    if A.numel() and float(spectral.max()) >= math.pi - angle_tol:
        raise NumericalError(
            f"a skew block has a rotation angle of {float(spectral.max()):.6g} >= pi: not a principal logarithm"
        )
    L = log_so(karcher_mean(exp_so(A), weights, tol=tol, max_iter=max_iter))
    if not magnitude_correction:
        return L
    w = _weights_tensor(weights, A.shape[0], A.ndim - 1).to(A.device)
    if granularity == "block":
        target = (w.reshape(w.shape[:-2]) * torch.linalg.matrix_norm(A)).sum(dim=0)[..., None, None]
        current = torch.linalg.matrix_norm(L)[..., None, None]
    else:
        dims = tuple(range(1, A.ndim))
        target = (w.reshape(-1) * torch.linalg.vector_norm(A, dim=dims)).sum()
        current = torch.linalg.vector_norm(L)
    # The mean is accurate to about tol per block: a smaller log has no reliable direction -> zero.
    blocks = 1 if granularity == "block" else max(1, math.prod(A.shape[1:-2]))
    reliable = current > _ZERO_FACTOR * tol * math.sqrt(blocks)
    scale = torch.where(reliable, target / torch.where(reliable, current, 1.0), torch.zeros_like(current))
    return L * scale
