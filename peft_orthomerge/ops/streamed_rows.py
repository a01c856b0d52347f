"""Residual methods by blocks of rows: a few row blocks of each task vector alive, never a whole one.

A *row task source* (`row_tasks.RowTasks`) gives the rows ``[start, stop)`` of task ``i``'s vector ``tau_i`` (a
task vector or a decoupled residual ``W_i - W0 @ P_i``) of ONE tensor of shape ``(rows, ...)``, as a
new tensor in the compute dtype, the same values on every call. Each ``prepare`` function here runs
its method's whole-tensor statistics in passes over the source and returns ``merged(start, stop)``:
the rows of the merged task vector, to be asked for block by block in increasing row order
(`row_blocks`), each once. The results are those of the registered in-memory methods
(`ops.euclidean`) to rounding: elementwise work is the same per block, and whole-tensor
quantities are exact.

- ``ties``: the trim keeps every entry above task ``i``'s ``k``-th largest magnitude ``v_i`` and the
  first equal ones in row-major order (`euclidean.trim_magnitude`'s rule). ``v_i`` is found exactly
  by a radix selection on the bit patterns of the magnitudes (non-negative floats order as their
  bits): each pass histograms the next `SELECT_BITS` bits of the entries still in the running
  bucket of every unresolved task, until at most `COLLECT_LIMIT` entries of a task remain in its
  bucket; one more pass collects those and selects exactly. Memory per task: a histogram of
  ``2**SELECT_BITS`` counts and at most `COLLECT_LIMIT` values. Then one pass does the sign
  election and disjoint mean block by block (`euclidean.sign_elect_mean`, elementwise).
- ``dare_ties`` / ``dare_ta``: DARE masks are functions of the entries' positions
  (`euclidean.dare_keep`), drawn per block: the same masks as the whole tensor; one pass.

- ``tsvm``: a matrix with at least as many rows as columns (`fits`); pass 1 accumulates each task's
  Gram matrix ``G_i = tau_i^T tau_i`` (``n x n``), whose top ``k`` eigenpairs give ``V_i`` and
  ``s_i`` (``U_i = tau_i V_i / s_i`` is never stored); pass 2 accumulates ``K = U^T U`` of the
  concatenated ``U = [U_1 ... U_N]`` (``N k x N k``), so that ``polar(U) = U K^{-1/2}``; the merge
  per block is ``lam * [tau_i V_i / s_i]_i K^{-1/2} diag(N w_i s_i) polar(V)^T``. A singular value
  from a Gram matrix is known to about ``sqrt(eps) s_max``: triplets with ``s <= sqrt(n eps) s_max``
  of their task are left out (the in-memory SVD gives the vectors of a zero singular value
  arbitrarily, and they enter ``polar(U)``), and directions of ``K`` below ``n eps`` of its largest
  eigenvalue (tasks sharing a direction exactly) are left out of ``K^{-1/2}``. Otherwise the same
  as `euclidean.tsvm` to rounding. Non-matrix tensors: ``lam`` times the weighted mean.

- ``fisher_rao`` (`streamed_rows_fisher`): the Karcher iteration on the coefficients of the mean in
  the span of the inputs, from their ``N x N`` Gram matrix (one pass), then one pass to merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Annotated

import torch

from ..errors import ConfigError
from . import streamed_rows_fisher
from .euclidean import (
    DENSITY,
    DROP,
    dare_drop,
    dare_seed,
    relative_weights,
    sign_elect_mean,
    top_k_count,
    trim_to_threshold_,
)
from .lapack import eigh
from .procrustes import polar_svd
from .row_tasks import MergedRows, RowTasks, row_blocks, row_numel

SELECT_BITS = 16  # bits of the magnitudes' patterns histogrammed per selection pass (512 KB of counts per task)
COLLECT_LIMIT = 1 << 20  # entries per task collected for the final exact selection


def _magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``|x|`` (flat, int64), ordered as the magnitudes."""
    a = x.abs().reshape(-1)
    if a.dtype == torch.float64:
        return a.view(torch.int64)
    if a.dtype == torch.float32:
        return a.view(torch.int32).to(torch.int64)
    raise ConfigError(f"the row-block TIES selects in float32 or float64, got {a.dtype}")


class _Selection:
    """Running radix selection of the ``rank``-th largest key of one task: the bits above ``hi`` are
    ``prefix``; ``greater`` entries are known to be above the bucket, ``size`` are in it."""

    def __init__(self, k: int, numel: int, value_bits: int) -> None:
        self.k, self.rank, self.greater, self.size = k, k, 0, numel
        self.prefix, self.hi = 0, value_bits

    def in_bucket(self, keys: torch.Tensor) -> torch.Tensor:
        return keys[(keys >> self.hi) == self.prefix]

    def narrow(self, counts: torch.Tensor, lo: int) -> None:
        """Descend into the digit (bits ``[lo, hi)``) that holds the ``rank``-th largest."""
        above = counts.flip(0).cumsum(0)  # above[j]: entries with digit >= top - j
        j = int(torch.searchsorted(above, torch.tensor(self.rank, dtype=above.dtype)))
        digit = counts.numel() - 1 - j
        beyond = int(above[j]) - int(counts[digit])
        self.greater += beyond
        self.rank -= beyond
        self.size = int(counts[digit])
        self.prefix = (self.prefix << (self.hi - lo)) | digit
        self.hi = lo


def magnitude_thresholds(tasks: RowTasks, ks: Sequence[int], dtype: torch.dtype) -> list[tuple[float, int]]:
    """Per task ``i``: its ``ks[i]``-th largest magnitude ``v_i`` (exact) and how many entries equal to
    ``v_i`` TIES keeps (``ks[i]`` minus the entries above it), by passes over ``tasks`` (module docstring)."""
    rows, numel = tasks.shape[0], tasks.shape[0] * row_numel(tasks.shape)
    value_bits = torch.finfo(dtype).bits - 1  # the sign bit of a magnitude is 0
    sel = [_Selection(k, numel, value_bits) for k in ks]
    while True:
        active = [i for i, s in enumerate(sel) if s.size > COLLECT_LIMIT and s.hi > 0]
        if not active:
            break
        lo = {i: max(0, sel[i].hi - SELECT_BITS) for i in active}
        counts = {i: torch.zeros(1 << (sel[i].hi - lo[i]), dtype=torch.int64) for i in active}
        for start, stop in row_blocks(rows, tasks.step):
            for i in active:
                keys = sel[i].in_bucket(_magnitude_keys(tasks.rows(i, start, stop)))
                digits = (keys >> lo[i]) & ((1 << (sel[i].hi - lo[i])) - 1)
                counts[i] += torch.bincount(digits.cpu(), minlength=counts[i].numel())
        for i in active:
            sel[i].narrow(counts[i], lo[i])
    found: list[list[torch.Tensor]] = [[] for _ in sel]
    for start, stop in row_blocks(rows, tasks.step):
        for i, s in enumerate(sel):
            found[i].append(s.in_bucket(_magnitude_keys(tasks.rows(i, start, stop))).cpu())
    out = []
    int_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    for s, parts in zip(sel, found):
        keys = torch.cat(parts)
        key = torch.kthvalue(keys, keys.numel() - s.rank + 1).values
        value = float(key.to(int_dtype).view(dtype))
        out.append((value, s.k - s.greater - int((keys > key).sum())))
    return out


def ties(
    tasks: RowTasks,
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    density: Annotated[float, DENSITY] = 0.2,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> MergedRows:
    """`euclidean.ties` by row blocks: exact per-task thresholds first, then the merge per block."""
    density = DENSITY.check("density", density)
    rel = relative_weights(weights)
    numel = tasks.shape[0] * row_numel(tasks.shape)
    thresholds = None
    if density < 1:
        thresholds = magnitude_thresholds(tasks, [top_k_count(numel, density)] * tasks.count, dtype)
    ties_left = [t[1] for t in thresholds] if thresholds else []

    def merged(start: int, stop: int) -> torch.Tensor:
        terms = []
        for i in range(tasks.count):
            term = tasks.rows(i, start, stop)
            if thresholds is not None:
                ties_left[i] -= trim_to_threshold_(term, thresholds[i][0], ties_left[i])
            terms.append(term.mul_(rel[i]))
        return sign_elect_mean(terms).mul_(float(lam))

    return merged


def _dropped(tasks: RowTasks, p: float, seed: int, start: int, stop: int) -> Iterator[torch.Tensor]:
    """Each task's rows ``[start, stop)`` after DARE's drop (masks by position, `euclidean.dare_keep`)."""
    offset = start * row_numel(tasks.shape)
    for i in range(tasks.count):
        block = tasks.rows(i, start, stop)
        yield block if p == 0 else dare_drop(block, p, seed, i, offset)


def dare_ties(
    tasks: RowTasks,
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    p: Annotated[float, DROP] = 0.5,
    lam: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MergedRows:
    """`euclidean.dare_ties` by row blocks (one pass)."""
    p = DROP.check("p", p)
    rel, stream = relative_weights(weights), dare_seed(generator, seed)

    def merged(start: int, stop: int) -> torch.Tensor:
        terms = [t.mul_(r) for t, r in zip(_dropped(tasks, p, stream, start, stop), rel)]
        return sign_elect_mean(terms).mul_(float(lam))

    return merged


def dare_ta(
    tasks: RowTasks,
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    p: Annotated[float, DROP] = 0.5,
    lam: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MergedRows:
    """`euclidean.dare_ta` by row blocks (one pass): ``lam * sum_i N w_i drop(tau_i)``, ``lam`` 1/N."""
    p = DROP.check("p", p)
    rel, stream = relative_weights(weights), dare_seed(generator, seed)
    scale = 1.0 / len(rel) if lam is None else float(lam)

    def merged(start: int, stop: int) -> torch.Tensor:
        total: torch.Tensor | None = None
        for term, r in zip(_dropped(tasks, p, stream, start, stop), rel):
            total = term * r if total is None else total.add_(term, alpha=r)
        return total.mul_(scale)

    return merged


def _top_triplets(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, s)``: the top ``k`` eigenvectors of the Gram matrix ``gram`` and the singular values
    ``sqrt(eigenvalue)``, without those at or below ``sqrt(n eps) s_max`` (module docstring)."""
    evals, evecs = eigh(gram)
    s = evals.flip(0)[:k].clamp(min=0).sqrt()
    keep = s > (gram.shape[0] * torch.finfo(gram.dtype).eps) ** 0.5 * float(s[0])
    return evecs.flip(1)[:, :k][:, keep], s[keep]


def _inverse_sqrt(k: torch.Tensor) -> torch.Tensor:
    """``K^{-1/2}`` of the symmetric positive semi-definite ``k`` on its eigenvalues above ``n eps`` of the largest."""
    evals, evecs = eigh(k)
    keep = evals > k.shape[0] * torch.finfo(k.dtype).eps * float(evals[-1].clamp(min=0))
    vecs = evecs[:, keep]
    return (vecs * evals[keep].rsqrt()) @ vecs.T


def tsvm(
    tasks: RowTasks,
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> MergedRows:
    """`euclidean.tsvm` by row blocks: two passes of ``n x n`` and ``N k x N k`` Gram matrices (module docstring)."""
    rel = relative_weights(weights)
    count = tasks.count
    if len(tasks.shape) != 2:

        def mean(start: int, stop: int) -> torch.Tensor:
            total: torch.Tensor | None = None
            for i in range(count):
                term = tasks.rows(i, start, stop).mul_(rel[i] / count)
                total = term if total is None else total.add_(term)
            return total.mul_(float(lam))

        return mean
    if not fits("tsvm", tasks.shape):
        raise ConfigError(f"the row-block TSV-M needs at least as many rows as columns, got {tasks.shape}")
    k = max(1, min(tasks.shape) // count)
    grams: list[torch.Tensor | None] = [None] * count
    for start, stop in row_blocks(tasks.shape[0], tasks.step):
        for i in range(count):
            x = tasks.rows(i, start, stop)
            grams[i] = x.T @ x if grams[i] is None else grams[i].addmm_(x.T, x)
    triplets = [_top_triplets(g, k) for g in grams]
    del grams
    proj = [v / s for v, s in triplets]  # U_i = tau_i V_i / s_i

    def left(start: int, stop: int) -> torch.Tensor:
        return torch.cat([tasks.rows(i, start, stop) @ proj[i] for i in range(count)], dim=1)

    gram_u: torch.Tensor | None = None
    for start, stop in row_blocks(tasks.shape[0], tasks.step):
        y = left(start, stop)
        gram_u = y.T @ y if gram_u is None else gram_u.addmm_(y.T, y)
    s_cat = torch.cat([s * r for (_, s), r in zip(triplets, rel)])
    v_polar = polar_svd(torch.cat([v for v, _ in triplets], dim=1))
    right = (_inverse_sqrt(gram_u) * s_cat) @ v_polar.T
    del gram_u, triplets

    def merged(start: int, stop: int) -> torch.Tensor:
        return (left(start, stop) @ right).mul_(float(lam))

    return merged


ROW_METHODS: dict[str, Callable[..., MergedRows]] = {
    "ties": ties,
    "dare_ties": dare_ties,
    "dare_ta": dare_ta,
    "tsvm": tsvm,
    "fisher_rao": streamed_rows_fisher.fisher_rao,
}


def fits(name: str, shape: Sequence[int]) -> bool:
    """Whether the row-block form of ``name`` takes a tensor of ``shape``: TSV-M's Gram matrices need
    a matrix with at least as many rows as columns (or a non-matrix); the others take any shape."""
    return name != "tsvm" or len(shape) != 2 or int(shape[0]) >= int(shape[1])


def row_method(name: str) -> Callable[..., MergedRows] | None:
    """The row-block form of the registered residual method ``name``, or ``None``."""
    return ROW_METHODS.get(name)
