"""Streamed Fisher-Rao merging: `fisher_rao.fisher_rao` on a task source (`ops.streamed`), one input alive at a time.

The same method as `fisher_rao` (see its module docstring for the formulas, the edge cases and
their rules): points ``x_i = v_i / ||v_i||`` of the flattened inputs ``v_i = base + tau_i``
(``on="weights"``) or ``v_i = tau_i``, their weighted spherical Karcher mean ``m`` by the
fixed-point iteration from the normalised weighted Euclidean mean, result
``(sum_i w_i ||v_i||) m`` (minus ``base``). Instead of an ``(N, numel)`` buffer, every pass
recomputes the points from the source: one pass for the norms (and finiteness, and whether all
inputs are equal), one for the Euclidean start, then one per iteration, accumulating for the
current ``m`` each point's ``cos_i = <x_i, m>`` and the weighted Log-map sum
``sum_i w_i theta_i / sin(theta_i) x_i`` as the point goes by. Memory: ``m``, the accumulator and
one point besides the source's own. Layout plays no role (tensors are flattened).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError, NumericalError
from .finite import all_finite
from .fisher_rao import default_tol, sphere_exp
from .karcher import angle_over_sin
from .weights import normalize_weights

ANTIPODAL_HINT = "Change the weights or leave out one of the opposing experts."


def _inputs(
    tasks, count: int, offset, dtype, inplace: bool = False
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(i, tau_i, v_i)`` with ``v_i`` flattened in ``dtype`` (plus ``offset``), one pass over ``tasks``;
    with ``inplace`` (a `streamed.FreshTasks` source) ``v_i`` may overwrite ``tau_i``."""
    seen = 0
    for tau in tasks():
        own = inplace and tau.dtype == dtype and tau.is_contiguous()
        v = tau.view(-1) if own else tau.reshape(-1).to(dtype, copy=True)
        if offset is not None:
            v.add_(offset)
        yield seen, tau, v
        del tau, v
        seen += 1
    if seen != count or count == 0:
        raise ConfigError(f"got {count} weights for {seen} task vectors")


def _norms(
    tasks, w: list[float], offset, dtype
) -> tuple[list[float], torch.Tensor | None, torch.Tensor, torch.device]:
    """First pass: ``||v_i||`` (0 for weight 0) and finiteness; returns ``(norms, the first kept task
    vector if every kept one equals it else None, an empty tensor of the inputs' shape, promoted
    dtype and device)``."""
    norms, first, same, like = [0.0] * len(w), None, True, None
    for i, tau, v in _inputs(tasks, len(w), offset, dtype):
        dtype_i = tau.dtype if like is None else torch.promote_types(like.dtype, tau.dtype)
        like = torch.empty(tau.shape, dtype=dtype_i, device="meta") if like is None else like.to(dtype_i)
        device = tau.device
        if w[i] <= 0:
            continue
        if not all_finite(v):
            raise NumericalError("non-finite values (NaN or Inf) in an input tensor")
        norms[i] = float(torch.linalg.vector_norm(v))
        if first is None:
            first = tau
        elif same:
            same = torch.equal(tau, first)
    return norms, (first if same else None), like, device


def _points(tasks, w, norms, offset, dtype) -> Iterator[tuple[float, torch.Tensor]]:
    """``(w_i, x_i)`` for the inputs with weight and norm > 0 (weights renormalised among them)."""
    total = sum(wi for wi, n in zip(w, norms) if wi > 0 and n > 0)
    for i, _, v in _inputs(tasks, len(w), offset, dtype, inplace=getattr(tasks, "fresh", False)):
        if w[i] > 0 and norms[i] > 0:
            yield w[i] / total, v.div_(norms[i])


def _karcher(tasks, w, norms, offset, dtype, tol, max_iter, antipodal_tol) -> torch.Tensor:
    """The weighted spherical Karcher mean of the points (`fisher_rao.spherical_karcher_mean`)."""
    euclid, count = None, 0
    for wi, x in _points(tasks, w, norms, offset, dtype):
        euclid = x.mul_(wi) if euclid is None else euclid.add_(x, alpha=wi)
        count += 1
    euclid_norm = float(torch.linalg.vector_norm(euclid))
    if euclid_norm < antipodal_tol:
        raise NumericalError(
            f"the inputs' directions cancel (weighted mean of the unit directions has norm {euclid_norm:.3g}): "
            "antipodal inputs have no unique spherical mean",
            hint=ANTIPODAL_HINT,
        )
    m = euclid.div_(euclid_norm)
    if count == 1:
        return m
    for _ in range(max_iter):
        g, a_cos, theta_max = torch.zeros_like(m), 0.0, 0.0
        for wi, x in _points(tasks, w, norms, offset, dtype):
            cos = torch.vdot(x, m).clamp(-1.0, 1.0)
            theta_max = max(theta_max, float(torch.acos(cos)))
            a = wi * float(angle_over_sin(cos))
            g.add_(x, alpha=a)
            a_cos += a * float(cos)
            del x
        if theta_max > math.pi - antipodal_tol:
            raise NumericalError(
                f"an input is within {antipodal_tol:g} rad of the antipode of the mean estimate: "
                "the spherical mean is not unique there",
                hint=ANTIPODAL_HINT,
            )
        g.sub_(m, alpha=a_cos)
        g_norm = float(torch.linalg.vector_norm(g))
        if g_norm < tol:
            return m
        m = sphere_exp(m, g)
        del g
    raise NumericalError(
        f"spherical Karcher mean did not converge in {max_iter} iterations (tangent update norm {g_norm:.3g}, tol {tol:g})",
        hint="Raise max_iter or tol; inputs spread over more than a hemisphere have no unique mean.",
    )


def fisher_rao(
    task_vectors,
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on: str = "weights",
    tol: float | None = None,
    max_iter: int = 500,
    antipodal_tol: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`fisher_rao.fisher_rao` on a task source ``task_vectors`` (module docstring); the merged task vector."""
    del generator
    if on not in ("weights", "task_vectors"):
        raise ConfigError(f"fisher_rao: on must be 'weights' or 'task_vectors', got {on!r}")
    if on == "weights" and base is None:
        raise ConfigError(
            "fisher_rao with on='weights' needs the base tensor",
            hint="Pass base=..., or on='task_vectors' to merge the task vectors themselves.",
        )
    if compute_dtype not in (torch.float64, torch.float32):
        raise ConfigError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
    if tol is None:
        tol = default_tol(compute_dtype)
    if not tol > 0 or max_iter < 1:
        raise ConfigError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    w = normalize_weights(weights, len(weights))
    offset = None if on == "task_vectors" else base.reshape(-1).to(compute_dtype)
    norms, same, like, device = _norms(task_vectors, w, offset, compute_dtype)
    if same is not None:
        return same.to(like.dtype, copy=True)
    if not any(n > 0 for n in norms):
        merged = torch.zeros(like.numel(), dtype=compute_dtype, device=device)
    else:
        m = _karcher(task_vectors, w, norms, offset, compute_dtype, tol, max_iter, antipodal_tol)
        merged = m.mul_(sum(wi * n for wi, n in zip(w, norms)))
    if offset is not None:
        merged = merged.sub_(offset)
    return merged.reshape(like.shape).to(like.dtype)
