"""Fisher-Rao merging by row blocks: the spherical Karcher iteration on the span of the inputs.

The method of `fisher_rao` (its module docstring has the formulas, edge cases and rules): points
``x_i = v_i / ||v_i||`` of the flattened inputs ``v_i = base + tau_i`` (``on="weights"``) or
``v_i = tau_i``, their weighted spherical Karcher mean ``m`` by the fixed-point iteration from the
normalised weighted Euclidean mean, result ``(sum_i w_i ||v_i||) m`` (minus ``base``).

Every iterate lies in the span of the points: ``m = sum_j a_j x_j``, and each step needs only inner
products, ``<x_i, m> = (C a)_i`` with the ``N x N`` Gram matrix ``C`` of the points, so one pass
over the row blocks (`row_tasks.RowTasks`) computes the norms, the Gram matrix and whether all
kept inputs are equal; the iteration runs on the coefficients ``a``:

    c = C a,   b_i = w_i theta_i / sin(theta_i),   g = sum_i b_i (x_i - c_i m)  ->  gamma = b - (b . c) a,
    |g|^2 = gamma^T C gamma,   a <- cos|g| a + sin|g| / |g| gamma, renormalised by (a^T C a)^{1/2};

and ``merged(start, stop)`` forms ``sum_j a_j x_j`` per block. Precision: ``C`` carries rounding
``eps`` per entry, so ``|g|^2`` is known to ``eps |gamma|^2`` absolutely; ``|gamma|`` is about ``|g|``
over the spread ``delta`` of the points, so the stopping test is reliable while ``|g| >> eps / delta``
(with the float64 default ``tol`` 1e-10, any spread above about 1e-6). Memory: ``N x N`` matrices
and the row blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError, NumericalError
from .finite import all_finite
from .fisher_rao import default_tol
from .karcher import angle_over_sin
from .row_tasks import MergedRows, RowTasks
from .weights import normalize_weights

ANTIPODAL_HINT = "Change the weights or leave out one of the opposing experts."


def _gram_pass(tasks: RowTasks, kept: list[int], on_weights: bool, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """One pass: the Gram matrix of the inputs ``v_i`` (``i`` in ``kept``) and whether all are equal."""
    gram = torch.zeros(len(kept), len(kept), dtype=torch.float64)
    same = True
    for start in range(0, tasks.shape[0], tasks.step):
        stop = min(tasks.shape[0], start + tasks.step)
        taus = [tasks.rows(i, start, stop) for i in kept]
        same = same and all(torch.equal(t, taus[0]) for t in taus[1:])
        if on_weights:
            b0 = tasks.base_rows(start, stop)
            for t in taus:
                t.add_(b0)
        flat = torch.stack([t.reshape(-1) for t in taus]).to(dtype)
        if not all_finite(flat):
            raise NumericalError("non-finite values (NaN or Inf) in an input tensor")
        gram += (flat @ flat.T).to(device="cpu", dtype=torch.float64)
        del taus, flat
    return gram, same


def _karcher_coefficients(
    gram: torch.Tensor, w: torch.Tensor, tol: float, max_iter: int, antipodal_tol: float
) -> torch.Tensor:
    """The coefficients ``a`` of the Karcher mean ``m = sum_j a_j x_j`` of unit points with Gram ``gram``."""
    euclid_norm = float(w @ gram @ w) ** 0.5
    if euclid_norm < antipodal_tol:
        raise NumericalError(
            f"the inputs' directions cancel (weighted mean of the unit directions has norm {euclid_norm:.3g}): "
            "antipodal inputs have no unique spherical mean",
            hint=ANTIPODAL_HINT,
        )
    a = w / euclid_norm
    if w.numel() == 1:
        return a
    g_norm = math.inf
    for _ in range(max_iter):
        cos = (gram @ a).clamp(-1.0, 1.0)
        if float(torch.acos(cos).max()) > math.pi - antipodal_tol:
            raise NumericalError(
                f"an input is within {antipodal_tol:g} rad of the antipode of the mean estimate: "
                "the spherical mean is not unique there",
                hint=ANTIPODAL_HINT,
            )
        b = w * angle_over_sin(cos)
        gamma = b - (b @ cos) * a
        g_norm = max(float(gamma @ gram @ gamma), 0.0) ** 0.5
        if g_norm < tol:
            return a
        a = math.cos(g_norm) * a + (math.sin(g_norm) / g_norm) * gamma
        a = a / float(a @ gram @ a) ** 0.5
    raise NumericalError(
        f"spherical Karcher mean did not converge in {max_iter} iterations (tangent update norm {g_norm:.3g}, tol {tol:g})",
        hint="Raise max_iter or tol; inputs spread over more than a hemisphere have no unique mean.",
    )


def fisher_rao(
    tasks: RowTasks,
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    on: str = "weights",
    tol: float | None = None,
    max_iter: int = 500,
    antipodal_tol: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype = torch.float64,
) -> MergedRows:
    """`fisher_rao.fisher_rao` by row blocks (module docstring); ``tasks`` needs ``base_rows`` for ``on="weights"``."""
    if on not in ("weights", "task_vectors"):
        raise ConfigError(f"fisher_rao: on must be 'weights' or 'task_vectors', got {on!r}")
    if compute_dtype not in (torch.float64, torch.float32):
        raise ConfigError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
    tol = default_tol(compute_dtype) if tol is None else tol
    if not tol > 0 or max_iter < 1:
        raise ConfigError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    w = normalize_weights(weights, len(weights))
    if len(w) != tasks.count:
        raise ConfigError(f"got {len(w)} weights for {tasks.count} task vectors")
    on_weights = on == "weights"
    kept = [i for i, wi in enumerate(w) if wi > 0]
    gram, same = _gram_pass(tasks, kept, on_weights, compute_dtype)
    if same:
        return lambda start, stop: tasks.rows(kept[0], start, stop)
    norms = gram.diagonal().clamp(min=0).sqrt()
    target_norm = sum(w[i] * float(n) for i, n in zip(kept, norms))
    live = [j for j in range(len(kept)) if float(norms[j]) > 0]
    coeffs = torch.zeros(len(kept), dtype=torch.float64)
    if live:
        sub = torch.tensor(live)
        unit_gram = gram[sub][:, sub] / torch.outer(norms[sub], norms[sub])
        wl = torch.tensor([w[kept[j]] for j in live], dtype=torch.float64)
        a = _karcher_coefficients(unit_gram, wl / wl.sum(), tol, max_iter, antipodal_tol)
        coeffs[sub] = target_norm * a / norms[sub]  # merged = sum_j coeffs_j v_j
    scale = [float(c) for c in coeffs]

    def merged(start: int, stop: int) -> torch.Tensor:
        total: torch.Tensor | None = None
        b0 = tasks.base_rows(start, stop).to(compute_dtype) if on_weights else None
        for j, i in enumerate(kept):
            v = tasks.rows(i, start, stop).to(compute_dtype)
            if b0 is not None:
                v.add_(b0)
            total = v.mul_(scale[j]) if total is None else total.add_(v, alpha=scale[j])
        if b0 is not None:
            total.sub_(b0)
        return total.to(dtype)

    return merged
