"""Streamed Euclidean merges: the non-linear residual methods with one task vector alive at a time.

A *task source* is a callable ``tasks()`` that returns a fresh iterator over the task vectors
``tau_i`` of ONE tensor, in task order, with the same values on every call (the callers recompute a
decoupled residual ``W_i - W0 @ P_i`` from its kept rotation and re-read the expert; see
`ops.decouple.dense`). A method calls it once per pass and drops each task vector before the next
one, so its memory is its accumulators plus one task vector and that task's temporaries, whatever
the number of tasks. Tensors may have any shape (layout plays no role, except TSV-M's ``(m, n)``).

Each function here computes the registered method of the same name (`ops.euclidean`, `ops.fisher_rao`)
with the same signature, except that ``task_vectors`` is a task source; results agree with the
in-memory methods to rounding (tested to 1e-10 relative):

- ``ties``: pass 1 trims each task (`euclidean.trim_magnitude`, on that task alone; in place for a
  `FreshTasks` source)
  and sums the weighted mass ``sum_i N w_i trim(tau_i)``, kept only as its sign; pass 2 trims again
  and accumulates the agreeing weighted entries and their count.
- ``dare_ties``: the same two passes with the DARE drop instead of the trim; each mask is a function
  of the task and the entries' positions (`euclidean.dare_keep`), so both passes and the in-memory
  method draw the same one.
- ``tsvm``: per task an SVD of that task alone, of which only the kept ``k`` triplets stay.
- ``fisher_rao`` (`streamed_fisher`): the spherical Karcher iteration of
  `fisher_rao.spherical_karcher_mean`, each iteration one pass over the (recomputed) inputs,
  accumulating the inner products and the weighted Log-map sum.

``ta`` and ``dare_ta`` are linear and already stream (`registry.merge_iter`): they are not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated

import torch

from ..errors import ConfigError
from . import streamed_fisher
from .euclidean import DENSITY, DROP, dare_drop, dare_seed, relative_weights, trim_magnitude, trim_magnitude_
from .lapack import svd
from .procrustes import polar_svd

TaskSource = Callable[[], Iterable[torch.Tensor]]
Transform = Callable[[int, torch.Tensor], torch.Tensor]


class FreshTasks:
    """A task source whose every task vector is a new tensor, which the method may overwrite (the
    callers' recomputed residuals and re-read task vectors): trims and weights then work in place."""

    fresh = True  # read by `streamed_fisher` (which `streamed` imports)

    def __init__(self, tasks: TaskSource) -> None:
        self.tasks = tasks

    def __call__(self) -> Iterable[torch.Tensor]:
        return self.tasks()


def is_fresh(tasks: TaskSource) -> bool:
    """Whether ``tasks`` is a `FreshTasks` (its task vectors may be modified in place): its ``fresh`` attribute."""
    return bool(getattr(tasks, "fresh", False))


def each_task(tasks: TaskSource, count: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, tau_i)`` from one fresh pass over ``tasks``; `ConfigError` unless it yields ``count`` tensors."""
    seen = 0
    for tau in tasks():
        if seen >= count:
            raise ConfigError(f"got {count} weights for more task vectors")
        yield seen, tau
        del tau
        seen += 1
    if seen != count or count == 0:
        raise ConfigError(f"got {count} weights for {seen} task vectors")


def _weighted(term: torch.Tensor, tau: torch.Tensor, weight: float, fresh: bool) -> torch.Tensor:
    """``weight * term``, in place where ``term`` is a new tensor (not the source's ``tau``, unless ``fresh``)."""
    return torch.mul(term, weight) if term is tau and not fresh else term.mul_(weight)


def _sign_elect_mean(tasks: TaskSource, weights: Sequence[float], transform: Transform) -> torch.Tensor:
    """TIES' sign election and disjoint mean over ``N w_i transform(i, tau_i)`` in two passes.

    Pass 1 keeps only the sign of the summed mass (ties to +); pass 2 the sum of the agreeing
    entries (sign 0 never agrees) and their count. ``transform`` must give the same tensor on both
    passes and must not be modified in place (it may be the caller's task vector)."""
    rel = relative_weights(weights)
    fresh = is_fresh(tasks)
    mass: torch.Tensor | None = None
    for i, tau in each_task(tasks, len(rel)):
        term = _weighted(transform(i, tau), tau, rel[i], fresh)
        del tau
        mass = term if mass is None else mass.add_(term)
        del term
    positive = mass >= 0
    del mass
    total: torch.Tensor | None = None
    count = torch.zeros(positive.shape, dtype=torch.uint8 if len(rel) < 256 else torch.int32, device=positive.device)
    for i, tau in each_task(tasks, len(rel)):
        term = _weighted(transform(i, tau), tau, rel[i], fresh)
        del tau
        agree = torch.where(positive, term > 0, term < 0)
        count.add_(agree)
        term.mul_(agree)
        total = term if total is None else total.add_(term)
        del term, agree
    return total.div_(count.clamp_(min=1).to(total.dtype))


def ties(
    task_vectors: TaskSource,
    weights,
    *,
    base=None,
    generator=None,
    density: Annotated[float, DENSITY] = 0.2,
    lam: float = 1.0,
):
    """`euclidean.ties` on a task source (two passes; module docstring)."""
    density = DENSITY.check("density", density)
    fresh = is_fresh(task_vectors)

    def trim(i: int, tau: torch.Tensor) -> torch.Tensor:
        if fresh and tau.is_contiguous():
            return trim_magnitude_(tau, density)
        return trim_magnitude(tau, density)

    return _sign_elect_mean(task_vectors, weights, trim).mul_(float(lam))


def dare_ties(
    task_vectors: TaskSource,
    weights,
    *,
    base=None,
    generator=None,
    p: Annotated[float, DROP] = 0.5,
    lam: float = 1.0,
    seed: int = 0,
):
    """`euclidean.dare_ties` on a task source: the same masks (`euclidean.dare_keep`) in both passes."""
    p = DROP.check("p", p)
    stream = dare_seed(generator, seed)

    def drop(i: int, tau: torch.Tensor) -> torch.Tensor:
        return tau if p == 0 else dare_drop(tau, p, stream, i)

    return _sign_elect_mean(task_vectors, weights, drop).mul_(float(lam))


def tsvm(task_vectors: TaskSource, weights, *, base=None, generator=None, lam: float = 1.0):
    """`euclidean.tsvm` on a task source: one SVD at a time, only the kept triplets stay.

    Non-matrix tensors: ``lam`` times the weighted mean, accumulated one task at a time."""
    count = len(weights)
    rel = relative_weights(weights)
    us, ss, vs = [], [], []
    acc: torch.Tensor | None = None
    for i, tau in each_task(task_vectors, count):
        if tau.dim() != 2:
            term = tau * (rel[i] / count)
            acc = term if acc is None else acc.add_(term)
            del term, tau
            continue
        k = max(1, min(tau.shape) // count)
        u, s, vh = svd(tau, full_matrices=False)
        del tau
        us.append(u[:, :k].clone())
        ss.append(s[:k] * rel[i])
        vs.append(vh[:k, :].T.clone())
        del u, s, vh
    if acc is not None:
        return acc.mul_(float(lam))
    u_cat = polar_svd(torch.cat(us, dim=1))  # (m, N k)
    del us
    v_cat = polar_svd(torch.cat(vs, dim=1))  # (n, N k)
    del vs
    return float(lam) * (u_cat * torch.cat(ss)) @ v_cat.T


STREAMED: dict[str, Callable[..., torch.Tensor]] = {
    "ties": ties,
    "dare_ties": dare_ties,
    "tsvm": tsvm,
    "fisher_rao": streamed_fisher.fisher_rao,
}


def streamed_method(name: str) -> Callable[..., torch.Tensor] | None:
    """The streamed form of the registered residual method ``name``, or ``None`` (linear methods
    stream already; methods without one get their task vectors as a list)."""
    return STREAMED.get(name)
