"""Fisher-Rao merging with the spherical (norm-preserving) proxy.

Method from "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold" (Wang, Ye, Yin, 2026),
in the reading of this project's issue 8 (the paper itself was not available to check line by line):
the Fisher-Rao Karcher mean of the experts is approximated, per tensor, by a weighted Karcher
(Frechet) mean on the unit sphere of the flattened tensors, and the merged tensor gets back a
magnitude: the weighted mean of the input norms. For inputs ``v_i`` (flattened) with weights
``w_i`` (summing to 1)::

    x_i = v_i / ||v_i||                                   # points on the unit sphere S^{n-1}
    m   = argmin_{|m|=1} sum_i w_i d(m, x_i)^2            # d = arccos <m, x> (geodesic distance)
    merged = (sum_i w_i ||v_i||) * m

``m`` is computed by the fixed-point (Riemannian gradient) iteration started at the normalised
weighted Euclidean mean ``sum_i w_i x_i / ||sum_i w_i x_i||``::

    g = sum_i w_i Log_m(x_i)        Log_m(x) = theta / sin(theta) * (x - cos(theta) m),  theta = d(m, x)
    m <- Exp_m(g)                   Exp_m(g) = cos(|g|) m + sin(|g|) g / |g|

until ``|g| < tol`` (at most ``max_iter`` steps). The unit step never increases the Frechet
function: away from the cut locus the Hessian of ``d(., x)^2 / 2`` on the unit sphere has
eigenvalues 1 and ``theta cot(theta) <= 1``, so the gradient is 1-Lipschitz (descent lemma). For
inputs spread over nearly a hemisphere the convergence is slow (linear, rate close to 1), hence
the generous default ``max_iter``. The result is the Karcher mean reached from the Euclidean start; it
is the unique one when the inputs lie in an open geodesic ball of radius pi/2 (a hemisphere).

Edge cases (documented rules, all tested):

- inputs with weight 0 are ignored altogether;
- a zero input (norm exactly 0) has no direction: it contributes norm 0 to the weighted mean of
  norms and nothing to the direction (the direction is the Karcher mean of the non-zero inputs,
  their weights renormalised among themselves); all inputs zero give the zero tensor. With one
  non-zero expert this equals task arithmetic ``sum_i w_i v_i``;
- identical (non-zero) inputs are returned as they are, bit for bit;
- antipodal or nearly antipodal inputs have no unique mean: `NumericalError` when the normalised
  Euclidean mean is shorter than ``antipodal_tol`` (the inputs cancel) or when an input lies
  within ``antipodal_tol`` radians of the antipode of the current estimate (its Log map is
  undefined there). No tie is broken silently;
- no convergence within ``max_iter`` steps: `NumericalError`.

Precision: the iteration runs in ``compute_dtype`` (float64 by default); the result is cast to the
promoted dtype of the inputs. float32 halves the memory for very large tensors; then the default
``tol`` is 1e-5 instead of 1e-10 and, for ``on="weights"``, the returned task vector carries an
absolute error of about 1e-7 * ||W|| (float32 rounding of the full weight), which is large relative
to a small task vector: prefer float64 wherever it fits. Memory: one ``(N, numel)`` buffer in
``compute_dtype`` besides the inputs; each iteration is three passes over it.

The registered Euclidean method ``"fisher_rao"`` acts by default on the full expert weights
``base + tau_i`` (``on="weights"``, as the paper merges whole checkpoints) and returns
``merged_full - base`` so that it fits the registry; ``on="task_vectors"`` merges the ``tau_i``.
Everything here is layout-agnostic (tensors are flattened), so torch's ``(out, in)`` convention
plays no role.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch

from ..errors import ConfigError, IncompatibleInputsError, NumericalError
from .finite import all_finite
from .karcher import angle_over_sin
from .registry import Range, register_euclidean
from .weights import normalize_weights

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
POSITIVE = Range(low=0.0, low_open=True)


def log_coefficients(m: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosines ``c_i = <m, x_i>``, angles ``theta_i`` and ``theta_i / sin(theta_i)``.

    ``Log_m(x_i) = ratio_i (x_i - c_i m)``. The ratio is flat in ``c`` near ``c = 1`` (its error
    there is far below the rounding of ``c``), so no extra pass over the data is needed for
    ``sin(theta_i)``.
    """
    cos = (points @ m).clamp(-1.0, 1.0)
    return cos, torch.acos(cos), angle_over_sin(cos)


def default_tol(dtype: torch.dtype) -> float:
    """The default ``tol`` of the Karcher iteration: 1e-10 in float64, 1e-5 otherwise."""
    return _DEFAULT_TOL.get(dtype, 1e-5)


def sphere_exp(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Exp_m(g)`` on the unit sphere (renormalised)."""
    norm = torch.linalg.vector_norm(g)
    out = torch.cos(norm) * m + (torch.sin(norm) / norm) * g
    return out / torch.linalg.vector_norm(out)


def spherical_karcher_mean(
    points: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 500,
    antipodal_tol: float = 1e-6,
) -> torch.Tensor:
    """Weighted Karcher mean of unit vectors on the sphere, by the fixed-point iteration.

    Args:
        points: ``(N, n)`` unit vectors (rows), all with positive weight; their dtype is the
            computation dtype (float64 or float32).
        weights: ``N`` positive weights summing to 1.
        tol: stop when the norm of the tangent update ``sum_i w_i Log_m(x_i)`` is below it
            (default 1e-10 in float64, 1e-5 in float32).
        max_iter: bound on the number of iterations.
        antipodal_tol: see the module docstring.

    Returns:
        The unit vector ``m`` (shape ``(n,)``) at which the weighted sum of Log maps vanishes.

    Raises:
        NumericalError: the inputs cancel or are antipodal to the estimate (no unique mean), or
            no convergence within ``max_iter`` steps.
    """
    if tol is None:
        tol = default_tol(points.dtype)
    if not tol > 0 or max_iter < 1:
        raise ConfigError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    w = torch.as_tensor(weights, dtype=points.dtype, device=points.device)
    euclid = w @ points
    euclid_norm = float(torch.linalg.vector_norm(euclid))
    if euclid_norm < antipodal_tol:
        raise NumericalError(
            f"the inputs' directions cancel (weighted mean of the unit directions has norm {euclid_norm:.3g}): "
            "antipodal inputs have no unique spherical mean",
            hint="Change the weights or leave out one of the opposing experts.",
        )
    m = euclid / euclid_norm
    if points.shape[0] == 1:
        return m

    cos, theta, ratio = log_coefficients(m, points)
    for _ in range(max_iter):
        if float(theta.max()) > math.pi - antipodal_tol:
            raise NumericalError(
                f"an input is within {antipodal_tol:g} rad of the antipode of the mean estimate: "
                "the spherical mean is not unique there",
                hint="Change the weights or leave out one of the opposing experts.",
            )
        a = w * ratio
        g = a @ points - (a @ cos) * m
        g_norm = float(torch.linalg.vector_norm(g))
        if g_norm < tol:
            return m
        m = sphere_exp(m, g)
        cos, theta, ratio = log_coefficients(m, points)
    raise NumericalError(
        f"spherical Karcher mean did not converge in {max_iter} iterations (tangent update norm {g_norm:.3g}, tol {tol:g})",
        hint="Raise max_iter or tol; inputs spread over more than a hemisphere have no unique mean.",
    )


def fisher_rao_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    offset: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 500,
    antipodal_tol: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Norm-preserving spherical Karcher mean of whole tensors (see the module docstring).

    Args:
        tensors: ``N`` tensors ``t_i`` of one shape (any layout; they are flattened).
        weights: task weights (uniform when ``None``); normalised to sum to 1.
        offset: if given, the merged points are ``v_i = offset + t_i`` and the function returns
            ``merged - offset`` (the full-weights reading with task vectors ``t_i``).
        tol, max_iter, antipodal_tol: passed to `spherical_karcher_mean`.
        compute_dtype: float64 (default) or float32.

    Returns:
        ``(sum_i w_i ||v_i||) * m`` (minus ``offset``) in the inputs' shape and promoted dtype.
    """
    if compute_dtype not in _DEFAULT_TOL:
        raise ConfigError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
    w = normalize_weights(weights, len(tensors))
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors) or (offset is not None and offset.shape != shape):
        shapes = [tuple(t.shape) for t in tensors] + ([] if offset is None else [tuple(offset.shape)])
        raise IncompatibleInputsError(f"cannot merge tensors of different shapes {shapes}")
    out_dtype = tensors[0].dtype
    for t in tensors[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)

    kept = [(t, wi) for t, wi in zip(tensors, w) if wi > 0]
    if all(torch.equal(t, kept[0][0]) for t, _ in kept[1:]):
        return kept[0][0].to(out_dtype, copy=True)

    device = tensors[0].device
    flat = torch.empty((len(kept), shape.numel()), dtype=compute_dtype, device=device)
    base = None if offset is None else offset.reshape(-1).to(compute_dtype)
    for row, (t, _) in zip(flat, kept):
        row.copy_(t.reshape(-1))
        if base is not None:
            row.add_(base)
    if not all_finite(flat):
        raise NumericalError("non-finite values (NaN or Inf) in an input tensor")
    kept_w = torch.tensor([wi for _, wi in kept], dtype=compute_dtype, device=device)
    norms = torch.linalg.vector_norm(flat, dim=1)
    target_norm = kept_w @ norms
    nonzero = norms > 0
    if not bool(nonzero.all()):
        flat, kept_w, norms = flat[nonzero], kept_w[nonzero], norms[nonzero]
    if flat.shape[0] == 0:
        merged = torch.zeros(shape.numel(), dtype=compute_dtype, device=device)
    else:
        points = flat.div_(norms[:, None])
        mean = spherical_karcher_mean(
            points, kept_w / kept_w.sum(), tol=tol, max_iter=max_iter, antipodal_tol=antipodal_tol
        )
        merged = target_norm * mean
    if base is not None:
        merged = merged - base
    return merged.reshape(shape).to(out_dtype)


@register_euclidean("fisher_rao")
def fisher_rao(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on: Literal["weights", "task_vectors"] = "weights",
    tol: Annotated[float, POSITIVE] | None = None,
    max_iter: Annotated[int, Range(low=1)] = 500,
    antipodal_tol: Annotated[float, Range(low=0.0)] = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Euclidean-registry entry ``"fisher_rao"``: returns the merged task vector.

    ``on="weights"`` (default) merges the full expert weights ``base + tau_i`` with
    `fisher_rao_merge` and returns ``merged_full - base`` (``base`` is then required);
    ``on="task_vectors"`` merges the ``tau_i`` themselves. ``generator`` is unused (the method is
    deterministic). The result has the promoted dtype of the task vectors.
    """
    del generator
    if not task_vectors:
        raise ConfigError("no task vectors to merge")
    options = {"tol": tol, "max_iter": max_iter, "antipodal_tol": antipodal_tol, "compute_dtype": compute_dtype}
    if on == "task_vectors":
        return fisher_rao_merge(task_vectors, weights, **options)
    if on != "weights":
        raise ConfigError(f"fisher_rao: on must be 'weights' or 'task_vectors', got {on!r}")
    if base is None:
        raise ConfigError(
            "fisher_rao with on='weights' needs the base tensor",
            hint="Pass base=..., or on='task_vectors' to merge the task vectors themselves.",
        )
    return fisher_rao_merge(task_vectors, weights, offset=base, **options)
