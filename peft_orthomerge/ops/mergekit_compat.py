"""Euclidean merges with mergekit 0.1.5's definitions, for configurations written for mergekit.

These methods have the registry signature (`registry`) and act per tensor, like `euclidean`. They
exist because mergekit's TIES, DARE and Karcher differ from this library's (and the papers') forms;
`recipe.mergekit` maps a mergekit configuration onto them so that the same config gives the same
tensors as ``mergekit-yaml``. Weights: the registry passes weights normalised to sum 1 (``w_i``);
mergekit multiplies by its raw weights ``W_i = S w_i``. Every quantity below is invariant to the
scale ``S`` except the un-normalised sums, so the caller folds ``S`` into ``lam`` (the
translation passes ``lam = lambda * S`` when ``normalize`` is false).

Definitions (``t_i`` the sparsified task vector of task ``i``):

- ``"mergekit_ties"`` (mergekit ``ties``): ``t_i`` = top ``max(1, int(density * numel))`` entries of
  ``tau_i`` by magnitude (``density`` default 1.0: no trim, where this library's ``ties`` defaults
  to 0.2); sign per entry of ``sum_i w_i t_i`` (ties to +); ``merged = lam * sum_agree w_i t_i /
  sum_agree w_i`` with ``normalize`` (default true; a zero divisor counts as 1), or without the
  division when ``normalize`` is false. This library's ``ties`` instead divides by the *count* of
  agreeing entries and weights by ``N w_i``.
- ``"mergekit_dare_ties"`` / ``"mergekit_dare_linear"`` (mergekit ``dare_ties`` / ``dare_linear``):
  ``t_i`` keeps each entry with probability ``density`` (default 1.0: nothing dropped) and, with
  ``rescale`` (default true), is multiplied by ``||tau_i||_1 / ||t_i||_1`` (mergekit's L1
  rescaling, skipped when either norm is below 1e-7) rather than DARE's ``1/density``; then the TIES
  consensus above (``dare_ties``, ``normalize`` default false) or the weighted sum (``dare_linear``).
  The masks come from a ``torch.Generator`` seeded with ``seed`` (mergekit draws
  ``torch.bernoulli`` from the global generator), so the kept entries differ from mergekit's; the
  definition, and every result with ``density`` 1, is the same.
- ``"mergekit_karcher"`` (mergekit ``karcher``): the Karcher mean on the unit sphere of the full
  weights ``base + tau_i`` with *uniform* weights (mergekit's karcher takes none), started at the
  normalised mean direction (the first input's direction when that mean is shorter than ``tol``),
  inputs with norm ``<= tol`` left out of the direction, terms with angle ``< tol`` skipped, and
  stopped after ``max_iter`` (10) steps or when the tangent update is shorter than ``tol`` (1e-5),
  with no error when it has not converged; the result is scaled by the mean input norm. This
  library's ``fisher_rao`` runs the same iteration to 1e-10 and raises when it does not converge.

Computation is in the task vectors' dtype (callers pass float32 or float64); mergekit computes in
the config's ``dtype``, so results agree to that dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from ..errors import ConfigError
from .euclidean import DENSITY, dare_keep, dare_seed, trim_magnitude
from .fisher_rao import POSITIVE, log_coefficients
from .registry import Range, register_euclidean

RESCALE_EPS = 1e-7  # mergekit's threshold below which the L1 rescaling is skipped


def _weights(task_vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> list[float]:
    if not task_vectors or len(task_vectors) != len(weights):
        raise ConfigError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    return [float(w) for w in weights]


def random_keep(tau: torch.Tensor, density: float, rescale: bool, seed: int, task: int) -> torch.Tensor:
    """Keep each entry of ``tau`` with probability ``density``; with ``rescale``, match its L1 norm.

    The mask is `euclidean.dare_keep` of task ``task`` (a function of each entry's position and the
    seed, the same masks as this library's DARE with drop probability ``1 - density``)."""
    if density >= 1:
        return tau
    keep = dare_keep(0, tau.numel(), 1.0 - density, seed, task).to(tau.device).view(tau.shape)
    kept = tau * keep.to(tau.dtype)
    if not rescale:
        return kept
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def consensus_sum(terms: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """``sum_agree w_i t_i`` (divided by ``sum_agree w_i``, zero counted as 1, with ``normalize``).

    The elected sign is that of ``sum_i w_i t_i`` (ties to +); an entry agrees when its sign
    equals the elected one (a zero entry never agrees)."""
    weighted = [t * w for t, w in zip(terms, weights)]
    majority = torch.where(sum(weighted) >= 0, 1.0, -1.0).to(weighted[0].dtype)
    total = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for term, w in zip(weighted, weights):
        agree = (term.sign() == majority).to(term.dtype)
        total.addcmul_(term, agree)
        divisor.add_(agree, alpha=w)
    if not normalize:
        return total
    return total.div_(divisor.masked_fill_(divisor == 0, 1.0))


def weighted_sum(terms: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i t_i`` as a new tensor."""
    total = terms[0] * weights[0]
    for term, w in zip(terms[1:], weights[1:]):
        total.add_(term, alpha=w)
    return total


@register_euclidean("mergekit_ties")
def mergekit_ties(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    density: Annotated[float, DENSITY] = 1.0,
    normalize: bool = True,
    lam: float = 1.0,
):
    """mergekit's ``ties``, per tensor (module docstring): magnitude trim, sum consensus, ``lam``."""
    w = _weights(task_vectors, weights)
    terms = [trim_magnitude(tau, DENSITY.check("density", density)) for tau in task_vectors]
    return consensus_sum(terms, w, normalize).mul_(float(lam))


def _dare(task_vectors, weights, generator, density, rescale, seed) -> tuple[list[torch.Tensor], list[float]]:
    w = _weights(task_vectors, weights)
    density = DENSITY.check("density", density)
    mask_seed = dare_seed(generator, seed)
    return [random_keep(tau, density, rescale, mask_seed, i) for i, tau in enumerate(task_vectors)], w


@register_euclidean("mergekit_dare_ties")
def mergekit_dare_ties(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    density: Annotated[float, DENSITY] = 1.0,
    rescale: bool = True,
    normalize: bool = False,
    lam: float = 1.0,
    seed: int = 0,
):
    """mergekit's ``dare_ties``, per tensor (module docstring): random keep, L1 rescale, sum consensus."""
    terms, w = _dare(task_vectors, weights, generator, density, rescale, seed)
    return consensus_sum(terms, w, normalize).mul_(float(lam))


@register_euclidean("mergekit_dare_linear")
def mergekit_dare_linear(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    density: Annotated[float, DENSITY] = 1.0,
    rescale: bool = True,
    lam: float = 1.0,
    seed: int = 0,
):
    """mergekit's ``dare_linear``, per tensor (module docstring): random keep, L1 rescale, weighted sum.

    mergekit's ``normalize`` divides by the sum of the raw weights: the caller folds it into ``lam``."""
    terms, w = _dare(task_vectors, weights, generator, density, rescale, seed)
    return weighted_sum(terms, w).mul_(float(lam))


def karcher_direction(points: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's uniform Karcher iteration on unit rows ``points`` (module docstring); a unit vector."""
    alpha = torch.full((points.shape[0],), 1.0 / points.shape[0], dtype=points.dtype, device=points.device)
    mean = alpha @ points
    norm = torch.linalg.vector_norm(mean)
    m = points[0].clone() if norm < tol else mean / norm
    for _ in range(max_iter):
        cos, theta, ratio = log_coefficients(m, points)
        a = torch.where(theta < tol, 0.0, alpha * ratio)
        g = a @ points - (a @ cos) * m
        g_norm = torch.linalg.vector_norm(g)
        if g_norm < tol:
            break
        m = torch.cos(g_norm) * m + torch.sin(g_norm) * (g / g_norm)
        m_norm = torch.linalg.vector_norm(m)
        if m_norm > tol:
            m = m / m_norm
    return m


@register_euclidean("mergekit_karcher")
def mergekit_karcher(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    max_iter: Annotated[int, Range(low=1)] = 10,
    tol: Annotated[float, POSITIVE] = 1e-5,
):
    """mergekit's ``karcher`` on the full weights ``base + tau_i``, per tensor; returns ``merged - base``.

    ``weights`` are ignored (uniform, as mergekit's karcher); ``base`` is required."""
    _weights(task_vectors, weights)
    if base is None:
        raise ConfigError("mergekit_karcher needs the base tensor (it merges the full weights base + tau_i)")
    full = torch.stack([(base + tau).reshape(-1) for tau in task_vectors])
    if len(task_vectors) == 1:
        return task_vectors[0].clone()
    norms = torch.linalg.vector_norm(full, dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(task_vectors[0]) - base
    direction = karcher_direction(full[valid] / norms[valid, None], max_iter=max_iter, tol=tol)
    merged = norms.mean() * direction
    return (merged.reshape(base.shape) - base).to(task_vectors[0].dtype)
