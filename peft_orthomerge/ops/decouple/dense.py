"""`decouple_merge`: decoupled merging of one 2-D weight with any Euclidean residual method.

Conventions: torch layout, ``W`` is ``(out, in)``; ``P_i`` (``in x in``) acts on the input side,
``W0 @ P_i``; ``Q_i = (P_i - I)(P_i + I)^-1``; merged ``P = cayley(c S)`` applied as
``W0 P = 2 W0 (I - c S)^-1 - W0`` (`cayley.cayley_apply`), or ``(W0 F) cayley(c S_F) F^T`` in the
reduced basis. Residuals ``rho_i = W_i - W0 @ P_i`` are merged by `registry`; result
``W0 @ P + rho_merged``. Task arithmetic is routed to the cheaper paths (`rows`, `reduced`).
See the package docstring for the whole method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ...errors import ConfigError, NumericalError
from ..cayley import cayley_apply, cayley_apply_leading
from ..euclidean import ta_coefficients
from ..finite import all_finite
from ..procrustes import check_solver
from ..registry import get_euclidean, merge_iter
from ..streamed import FreshTasks, streamed_method
from .given import BlockRotation
from .paths import decoupling_path
from .reduced import merge_ta_reduced
from .rows import decouple_merge_ta_rows
from .solve import check_pair, solver_feed
from .stats import DecoupleStats, SkewSum, diff_norm, merged_stats
from .targets import TARGETS, conflict_target


def _check_inputs(
    w0: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], target, solver: str, name
) -> None:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: 'global', 'conflict', None")
    check_solver(solver)
    if len(experts) != len(weights) or not experts:
        raise ConfigError(f"got {len(weights)} weights for {len(experts)} experts")
    for e in experts:
        check_pair(w0, e, name)


def _first_pass(
    base: torch.Tensor, full: Callable[[int], torch.Tensor], count: int, weights: list[float], target, name
) -> tuple[DecoupleStats, torch.Tensor | None]:
    """One expert at a time and before any work: finiteness, ``||tau_i||``, for the conflict
    target the weighted mean task vector. Returns ``(stats, mean)``."""
    stats = DecoupleStats()
    mean = base.new_zeros(base.shape) if target == "conflict" else None
    finite = all_finite(base)
    for i in range(count):
        if not finite:
            break
        f = full(i)
        finite = all_finite(f)
        tau = f - base
        del f
        stats.task_vector_norms.append(float(torch.linalg.matrix_norm(tau)))
        if mean is not None:
            mean.add_(weights[i] * tau)
        del tau
    if not finite:
        raise NumericalError("base or expert weight contains NaN or Inf", tensor=name)
    return stats, mean


def _residuals(
    base: torch.Tensor,
    full: Callable[[int], torch.Tensor],
    count: int,
    weights: list[float],
    target: str,
    mean: torch.Tensor | None,
    stats: DecoupleStats,
    feed: tuple[list[torch.Tensor], Iterator],
    skew: SkewSum,
    name: str | None,
    given: Sequence[BlockRotation | None],
    rots: list | None = None,
) -> Iterator[torch.Tensor]:
    """``rho_i = W_i - W0 @ P_i`` in expert order (``rho_i = tau_i`` where the target is the
    base: ``P_i = I``; ``P_i`` of ``given[i]`` where an expert brings its rotation, whatever the
    target); one expert's rotation, basis and full weight are alive at a time. With ``rots`` (a
    list) each rotation (``None`` for ``P_i = I``) is appended to it, for `_replay`, or a copy of
    the residual itself where it is smaller than an ``in x in`` matrix (wide weights:
    ``down_proj``, GQA ``k``/``v``), which `_replay` then hands out again."""
    pending, solved = feed
    for i in range(count):
        f = full(i)
        rot = given[i]
        if rot is not None:
            stats.skew_norms[i] = skew.add_generator(rot.generator(base.shape[1], base), weights[i])
        else:
            t = f if target == "global" else conflict_target(f, base, mean, stats)[0]
            if not torch.equal(t, base):
                pending.append(t)
                del t  # iter_procrustes drops it before yielding
                rot, info = next(solved)
                stats.skew_norms[i] = skew.add(rot, info, weights[i], base, name)
            else:
                del t
        if rot is None:
            rho = f - base
            if rots is not None:
                rots.append(None)
        else:
            rho = rot.rotate_base(base)
            stats.orth_part_norms[i] = diff_norm(rho, base)
            rho.neg_().add_(f)  # W_i - W0 @ P_i, in place (the same rounding as f - rotated)
            if rots is not None:  # the smaller of the residual and the rotation
                rots.append(rho.clone() if rho.numel() < base.shape[1] ** 2 else rot)
            del rot
        del f
        stats.residual_norms.append(float(torch.linalg.matrix_norm(rho)))
        yield rho
        del rho


def _replay(base: torch.Tensor, full: Callable[[int], torch.Tensor], rots: list) -> Iterator[torch.Tensor]:
    """The residuals of `_residuals` again, from its kept rotations or residuals ``rots`` (no solve, no
    statistics): the same operations on the same inputs, so the same values."""
    for i, rot in enumerate(rots):
        if isinstance(rot, torch.Tensor):  # the kept residual: a fresh copy (the method may overwrite it)
            yield rot.clone()
            continue
        f = full(i)
        if rot is None:
            rho = f - base
        else:
            rho = rot.rotate_base(base)
            rho.neg_().add_(f)
        del f
        yield rho
        del rho


def _rotated_base(base: torch.Tensor, skew: SkewSum, c: float) -> torch.Tensor:
    """``W0 @ cayley(c S)``: dense ``S``, or ``(W0 F) cayley(c S_F) F^T`` with ``S_F`` in frame coordinates."""
    if skew.frame is None:
        return cayley_apply(base, skew.skew, c)
    rotated = cayley_apply_leading(skew.base_coords, skew.skew, c)
    skew.skew = skew.base_coords = None
    return skew.frame.right_t(rotated)


def decouple_merge(
    w0: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    target: str | None = "global",
    residual: str = "ta",
    residual_kwargs: Mapping[str, Any] | None = None,
    solver: str = "auto",
    *,
    generator: torch.Generator | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    given: Sequence[BlockRotation | None] | None = None,
) -> tuple[torch.Tensor, DecoupleStats]:
    """Merge the expert weights ``experts`` (full weights ``W_i``, torch layout) of one 2-D tensor.

    ``weights`` must be normalised (sum 1). Returns ``(merged weight in dtype, stats)``. An expert
    equal to the base (zero task vector, e.g. a module an adapter does not touch) contributes
    ``P_i = I``, ``Q_i = 0``, ``rho_i = 0``. See the package docstring for the formulas.

    ``given[i]`` (`given.BlockRotation`, an OFT adapter's exact rotation) replaces expert ``i``'s
    Procrustes fit, whatever the target: ``P_i`` is that rotation, ``Q_i`` its block-diagonal
    generator, ``rho_i = W_i - W0 @ P_i`` (``W_i``: the weight the expert really applies). The
    conflict target's mean task vector still counts every expert. Any given rotation sends the
    weight to the dense driver (`paths.decoupling_path`), which sums every ``Q_i`` densely in so(in).

    Memory: ``experts`` may stay in their storage dtype; each is converted to ``dtype`` when its
    turn comes and dropped after. The residuals are produced one at a time and handed to the
    Euclidean method through `registry.merge_iter`: a linear method (``ta``, ``dare_ta``) keeps a
    running sum, so only the base, the accumulator and one expert's temporaries are alive in
    ``dtype``. A method with a streamed form (`ops.streamed`: ``ties``, ``dare_ties``, ``tsvm``,
    ``fisher_rao``) makes several passes: the first solves and keeps each rotation (``in x in`` or
    its reduced factors), the later ones recompute ``rho_i = W_i - W0 @ P_i`` from it and the
    expert (re-read), so besides the base, the rotations and the method's accumulators only one
    residual is alive; where a residual is smaller than an ``in x in`` matrix (``out < in``) the
    residual itself is kept instead of its rotation. Any other method gets the residuals as a list.
    """
    _check_inputs(w0, experts, weights, target, solver, name)
    given = [None] * len(experts) if given is None else list(given)
    if len(given) != len(experts):
        raise ConfigError(f"got {len(given)} given rotations for {len(experts)} experts")
    dense = any(g is not None for g in given)
    path = decoupling_path(w0.shape, target, residual, residual_kwargs, given=dense)
    if path == "rows":
        return decouple_merge_ta_rows(
            w0, experts, weights, target, residual_kwargs, solver, name=name, dtype=dtype, rtol=rtol
        )
    merge_fn = get_euclidean(residual)
    kwargs = dict(residual_kwargs or {})
    weights = list(weights)
    base = w0.to(dtype)
    count = len(experts)

    def full(i: int) -> torch.Tensor:
        return experts[i].to(device=base.device, dtype=dtype)

    stats, mean = _first_pass(base, full, count, weights, target, name)
    if path == "reduced":  # task arithmetic in the reduced basis never forms a residual
        coeffs = ta_coefficients(weights, kwargs.get("lam"))  # merged residual = sum_i c_i rho_i
        return merge_ta_reduced(base, full, weights, coeffs, target, mean, stats, solver, rtol, name)

    streamed = streamed_method(residual)

    def merge(vectors: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
        if streamed is not None:  # several passes, each recomputing the residuals
            return streamed(vectors, weights, base=base, generator=generator, **kwargs)
        return merge_iter(merge_fn, vectors(), weights, base=base, generator=generator, **kwargs)

    if target is None:
        merged_tau = merge(FreshTasks(lambda: (full(i) - base for i in range(count))))
        stats.residual_norms = list(stats.task_vector_norms)
        stats.solver = "none"
        return base + merged_tau.to(dtype), stats
    feed, skew = solver_feed(base, solver, rtol), SkewSum(dense=dense)
    stats.skew_norms, stats.orth_part_norms = [0.0] * count, [0.0] * count
    rots: list | None = [] if streamed is not None else None  # kept for the later passes
    first = _residuals(base, full, count, weights, target, mean, stats, feed, skew, name, given, rots)
    del mean  # the residual stream holds it while it runs
    return _merge_rotated(base, _passes(first, base, full, rots), feed, skew, stats, merge, dtype), stats


def _passes(
    first: Iterator[torch.Tensor], base: torch.Tensor, full: Callable[[int], torch.Tensor], rots
) -> FreshTasks:
    """The residual source: ``first`` (`_residuals`, which fills ``rots``) on the first call, `_replay` after."""
    passes = [first]

    def residuals() -> Iterator[torch.Tensor]:
        return passes.pop() if passes else _replay(base, full, rots)

    return FreshTasks(residuals)


def _merge_rotated(
    base: torch.Tensor,
    residuals: Callable[[], Iterator[torch.Tensor]],
    feed: tuple[list[torch.Tensor], Iterator],
    skew: SkewSum,
    stats: DecoupleStats,
    merge: Callable[[Callable[[], Iterable[torch.Tensor]]], torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W0 @ P + merge(rho_i)``: Procrustes solves one target at a time (``feed``), when the first
    residual stream of ``residuals`` (`_residuals`, then `_replay`) handed to ``merge`` asks for it."""
    rho = merge(residuals).to(dtype)
    feed[1].close()  # drops the shared QR of W0^T
    del residuals, feed
    c = merged_stats(stats, skew)
    if c is None:
        return base + rho
    return _rotated_base(base, skew, c).add_(rho)
