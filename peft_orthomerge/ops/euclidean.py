"""Euclidean merges of task vectors (or decoupled residuals): TA, TIES, DARE, TSV-M.

Every method has the registry signature (see `registry`); its parameters are the keyword-only
arguments after ``base`` and ``generator``, value ranges declared in the annotations::

    fn(task_vectors, weights, *, base=None, generator=None, **kwargs) -> merged task vector

``task_vectors`` are same-shaped tensors ``tau_i`` of ONE tensor of the model; ``weights`` are
normalised (sum 1). All trimming / dropping / SVD truncation is done **per tensor** (never over
the whole model). Non-uniform weights enter as relative weights ``N w_i`` (mean 1, so uniform
weights give the methods' textbook form). ``base`` is accepted and unused. Computation is in
the task vectors' dtype (callers pass fp32 or fp64).

Defaults (the paper's setup):

- ``"ta"``: ``lam * sum_i (N w_i) tau_i``; ``lam`` defaults to ``1/N``, i.e. the weighted mean
  ``sum_i w_i tau_i``. With uniform weights ``lam = L`` gives ``L * sum_i tau_i``.
- ``"ties"``: trim each ``tau_i`` to its top ``density`` (0.2) fraction by magnitude (at least one
  entry per task), elect the sign per entry by summed (weighted) mass, average the entries
  agreeing with it (disjoint mean), times ``lam`` (1.0). See `ties` for how weights enter.
- ``"dare_ta"`` / ``"dare_ties"``: drop each entry with probability ``p`` (0.5), rescale the
  survivors by ``1/(1-p)``, then TA (``lam`` default ``1/N``) or TIES' sign election and disjoint
  mean (no magnitude trim; ``lam`` 1.0). Seeded: each entry's keep draw comes from a stream
  seeded by ``generator``'s initial seed (else ``seed``, 0), the task and the entry's chunk of
  `DARE_CHUNK` positions (`dare_keep`), so results are reproducible and the same whole, by row
  blocks or on several processes.
- ``"tsvm"`` (TSV-M): per matrix ``(m, n)`` each task keeps its top ``k = max(1, min(m, n) // N)``
  singular triplets (singular values scaled by ``N w_i``); the concatenated ``U`` and ``V`` are
  replaced by their polar factors; merged ``= lam * U diag(S) V^T`` with ``lam`` 1.0. 1-D (and
  other non-matrix) tensors fall back to ``lam`` times the weighted mean.

``"ta"`` and ``"dare_ta"`` are registered ``linear``: they accept any iterable of task vectors
and consume it one at a time (see `registry.merge_iter`); the others stack their inputs.

Magnitude trimming (`trim_magnitude`) is PEFT's `peft.utils.merge_utils.magnitude_based_pruning`
(top-k) except that it keeps at least one entry and breaks ties by position (`trim_magnitude`);
sign election and disjoint mean follow PEFT's helpers, written task by task (`sign_elect_mean`).
`ops.streamed` has the same methods with one task vector alive at a time, `ops.streamed_rows`
with a few blocks of rows alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated

import torch

from ..errors import ConfigError
from .lapack import svd
from .procrustes import polar_svd
from .registry import Fraction, register_euclidean

DENSITY = Fraction(low_open=True)  # TIES: the kept fraction, (0, 1]
DROP = Fraction(high_open=True)  # DARE: the drop probability, [0, 1)


def _relative(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Relative weights ``N w_i`` (mean 1), shaped to broadcast against the stacked tensors."""
    w = torch.tensor([len(weights) * float(x) for x in weights], dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def _stack(task_vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    if not task_vectors or len(task_vectors) != len(weights):
        raise ConfigError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    return torch.stack(list(task_vectors))


def relative_weights(weights: Sequence[float]) -> list[float]:
    """The relative weights ``N w_i`` (mean 1) as Python floats."""
    return [len(weights) * float(x) for x in weights]


def top_k_count(numel: int, density: float) -> int:
    """TIES' kept count per task: ``k = min(numel, max(1, int(density * numel)))`` (at least one entry)."""
    return min(numel, max(1, int(density * numel)))


def magnitude_threshold(x: torch.Tensor, k: int) -> tuple[float, int]:
    """The ``k``-th largest magnitude ``v`` of ``x`` and how many entries equal to ``v`` the trim keeps
    (``k`` minus the number of entries above ``v``)."""
    a = x.abs().reshape(-1)
    v = torch.kthvalue(a, a.numel() - k + 1).values
    return float(v), k - int((a > v).sum())


def trim_to_threshold_(x: torch.Tensor, threshold: float, ties: int) -> int:
    """Zero, in place, every entry of the contiguous ``x`` with magnitude below ``threshold`` and all but
    the first ``ties`` (flat order) equal to it; returns how many equal entries it kept. Applied to the
    consecutive pieces of one tensor in order, with ``ties`` reduced by each piece's return, it trims
    the pieces exactly as the whole tensor (`trim_magnitude`)."""
    a = x.abs()
    x.masked_fill_(a < threshold, 0)
    equal = (a == threshold).view(-1).nonzero().view(-1)
    del a
    if equal.numel() > ties:
        x.view(-1)[equal[max(ties, 0) :]] = 0
    return min(max(ties, 0), equal.numel())


def trim_magnitude_(x: torch.Tensor, density: float) -> torch.Tensor:
    """`trim_magnitude` in place (``x`` contiguous): all but its top ``k`` entries by magnitude set to 0."""
    if density >= 1:
        return x
    threshold, ties = magnitude_threshold(x, top_k_count(x.numel(), density))
    trim_to_threshold_(x, threshold, ties)
    return x


def trim_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim of one task vector: a new tensor keeping its top ``k = max(1, int(density * numel))``
    entries by magnitude, zeros (+0.0) elsewhere; ``x`` itself when ``density >= 1``.

    The kept set is every entry above the ``k``-th largest magnitude ``v`` and, of the entries equal
    to ``v``, the first ones in flat (row-major) order: a definite rule for ties, which a trim by
    blocks of rows (`streamed_rows`) reproduces exactly. Without ties this is ``torch.topk``'s set,
    as PEFT's ``magnitude_based_pruning`` (which keeps none when ``density * numel < 1``)."""
    return x if density >= 1 else trim_magnitude_(x.clone(memory_format=torch.contiguous_format), density)


def sign_elect_mean(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election (summed weighted mass) and disjoint mean over agreeing non-zero entries.

    ``terms`` are the weighted (trimmed or dropped) task vectors ``N w_i t_i`` of one tensor or one
    block of it; the result is a new tensor. The same formula as PEFT's
    ``calculate_majority_sign_mask(method="total")`` + ``disjoint_merge``: the sign per entry is that
    of the summed mass (ties to +), sign 0 (a dropped / trimmed entry) never agrees, and the
    agreeing entries are averaged over their count. Elementwise, so blocks of rows merge
    independently."""
    mass = terms[0].clone()
    for term in terms[1:]:
        mass.add_(term)
    positive = mass >= 0
    del mass
    total = torch.zeros_like(terms[0])
    count = torch.zeros(positive.shape, dtype=torch.uint8 if len(terms) < 256 else torch.int32, device=positive.device)
    for term in terms:
        agree = torch.where(positive, term > 0, term < 0)
        count.add_(agree)
        total.addcmul_(term, agree.to(term.dtype))
        del agree
    return total.div_(count.clamp_(min=1).to(total.dtype))


def _weighted_sum(task_vectors: Iterable[torch.Tensor], weights: Sequence[float], transform=None) -> torch.Tensor:
    """``sum_i (N w_i) transform(i, tau_i)``, consuming ``task_vectors`` once, in order: only the
    accumulator and the current term are alive (a generator of task vectors streams)."""
    count = len(weights)
    acc: torch.Tensor | None = None
    seen = 0
    for tau in task_vectors:
        if seen >= count:
            raise ConfigError(f"got {count} weights for more task vectors")
        term = tau if transform is None else transform(seen, tau)
        coeff = count * float(weights[seen])
        if acc is None:
            acc = term * coeff  # a new tensor: the caller's task vector is never modified
        else:
            acc.add_(term, alpha=coeff)
        del term
        seen += 1
    if acc is None or seen != count:
        raise ConfigError(f"got {count} weights for {seen} task vectors")
    return acc


def _ta_lam(count: int, lam: float | None) -> float:
    return 1.0 / count if lam is None else float(lam)


def ta_coefficients(weights: Sequence[float], lam: float | None = None) -> list[float]:
    """The ``c_i`` of task arithmetic, ``merged = sum_i c_i tau_i = lam * sum_i (N w_i) tau_i``, for
    callers that apply the linear combination themselves (the streamed decoupled merges)."""
    lam = _ta_lam(len(weights), lam)
    return [lam * len(weights) * float(w) for w in weights]


@register_euclidean("ta", linear=True)
def task_arithmetic(task_vectors, weights, *, base=None, generator=None, lam: float | None = None):
    """Task arithmetic, per tensor: ``lam * sum_i (N w_i) tau_i``; ``lam`` default ``1/N`` (weighted mean).

    Linear: ``task_vectors`` may be any iterable, consumed one at a time (no stacked copy)."""
    return _weighted_sum(task_vectors, weights).mul_(_ta_lam(len(weights), lam))


@register_euclidean("ties")
def ties(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    density: Annotated[float, DENSITY] = 0.2,
    lam: float = 1.0,
):
    """TIES, per tensor: top-``density`` magnitude trim per task (0.2), sign election, disjoint mean, ``lam`` (1.0).

    Trim: each task keeps its top ``max(1, int(density * numel))`` entries by magnitude
    (`trim_magnitude`; at least one, also where ``density * numel < 1``). Weights: each trimmed
    ``tau_i`` is multiplied by its relative weight ``N w_i`` first; the sign per entry is that of
    ``sum_i N w_i trim(tau_i)`` (ties to +), and the disjoint mean averages the *weighted* entries
    ``N w_i trim(tau_i)`` whose sign agrees, dividing by their count. Uniform weights give PEFT's
    and the paper's TIES. Differences: PEFT's ``ties`` elects the sign on the unweighted trimmed
    tensors and weights only the mean (``sum w_i t_i / count``, not rescaled to mean 1);
    mergekit's divides the weighted sum of agreeing entries by the sum of their weights
    (``sum_agree w_i t_i / sum_agree w_i``) instead of their count.
    """
    density = DENSITY.check("density", density)
    stack = _stack(task_vectors, weights)
    if density < 1:
        for i in range(stack.shape[0]):  # in place, one task at a time
            stack[i] = trim_magnitude(stack[i], density)
    return float(lam) * sign_elect_mean(list(stack.mul_(_relative(weights, stack)).unbind(0)))


DARE_CHUNK = 1 << 16  # DARE draws its keep mask in chunks of this many flat entries, one seeded stream each


def dare_stream_seed(seed: int, task: int, chunk: int) -> int:
    """The seed of DARE's random stream for chunk ``chunk`` of task ``task`` (splitmix64 of the three)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(task) * 0xBF58476D1CE4E5B9 + int(chunk)) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def dare_keep(start: int, stop: int, p: float, seed: int, task: int) -> torch.Tensor:
    """DARE's keep mask (CPU, bool) of the flat entries ``[start, stop)`` of task ``task``'s vector.

    Entry ``j`` is kept when ``u_j >= p``, with ``u_j`` the ``(j mod DARE_CHUNK)``-th float64 of
    ``torch.rand`` from a CPU generator seeded with `dare_stream_seed` ``(seed, task, j // DARE_CHUNK)``:
    a function of the entry's position alone, so a tensor dropped whole, by blocks of rows of any
    size, or on any number of processes gets the same mask. (Not the numbers of one ``torch.rand``
    over the whole tensor: masks differ from such a draw, with the same distribution.)"""
    parts = []
    for chunk in range(start // DARE_CHUNK, (stop - 1) // DARE_CHUNK + 1):
        gen = torch.Generator().manual_seed(dare_stream_seed(seed, task, chunk))
        u = torch.rand(DARE_CHUNK, generator=gen, dtype=torch.float64)
        lo, hi = max(start, chunk * DARE_CHUNK), min(stop, (chunk + 1) * DARE_CHUNK)
        parts.append(u[lo - chunk * DARE_CHUNK : hi - chunk * DARE_CHUNK] >= p)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def dare_seed(generator: torch.Generator | None, seed: int) -> int:
    """The seed of DARE's masks: ``generator``'s initial seed, else ``seed``."""
    return int(generator.initial_seed()) if generator is not None else int(seed)


def dare_drop(x: torch.Tensor, p: float, seed: int, task: int, offset: int = 0) -> torch.Tensor:
    """DARE on ``x``, the flat entries ``[offset, offset + x.numel())`` of task ``task``'s vector: a new
    tensor keeping each entry by `dare_keep`, rescaled by ``1/(1-p)``."""
    keep = dare_keep(offset, offset + x.numel(), p, seed, task).to(x.device).view(x.shape)
    return x * keep.to(x.dtype) / (1.0 - p)


def _dare_drop(stack: torch.Tensor, p: float, generator: torch.Generator | None, seed: int) -> torch.Tensor:
    """DARE on each task of ``stack`` (overwritten), task ``i``'s mask from `dare_keep`."""
    p = DROP.check("p", p)
    if p == 0:
        return stack
    for i in range(stack.shape[0]):
        stack[i] = dare_drop(stack[i], p, dare_seed(generator, seed), i)
    return stack


@register_euclidean("dare_ta", linear=True)
def dare_ta(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    p: Annotated[float, DROP] = 0.5,
    lam: float | None = None,
    seed: int = 0,
):
    """DARE + TA, per tensor: drop with probability ``p`` (0.5), rescale ``1/(1-p)``, then TA (``lam`` 1/N).

    Linear: each task's mask is a function of its entries' positions (`dare_keep`, seeded by
    ``generator``'s initial seed, else ``seed``), so ``task_vectors`` may be any iterable, consumed one
    at a time."""
    p = DROP.check("p", p)
    lam = _ta_lam(len(weights), lam)
    stream = dare_seed(generator, seed)

    def drop(i: int, tau: torch.Tensor) -> torch.Tensor:
        return tau if p == 0 else dare_drop(tau, p, stream, i)

    return _weighted_sum(task_vectors, weights, drop).mul_(lam)


@register_euclidean("dare_ties")
def dare_ties(
    task_vectors,
    weights,
    *,
    base=None,
    generator=None,
    p: Annotated[float, DROP] = 0.5,
    lam: float = 1.0,
    seed: int = 0,
):
    """DARE + TIES, per tensor: drop ``p`` (0.5) and rescale, sign election, disjoint mean, ``lam`` (1.0).

    Masks as `dare_ta` (`dare_keep`)."""
    stack = _dare_drop(_stack(task_vectors, weights), p, generator, seed)
    return float(lam) * sign_elect_mean(list(stack.mul_(_relative(weights, stack)).unbind(0)))


@register_euclidean("tsvm")
def tsvm(task_vectors, weights, *, base=None, generator=None, lam: float = 1.0):
    """TSV-M, per matrix: top ``min(m,n)//N`` triplets per task, polar-orthogonalised U and V, ``lam`` (1.0).

    Non-matrix tensors: ``lam`` times the weighted mean.
    """
    stack = _stack(task_vectors, weights)
    if stack.dim() != 3:
        return float(lam) * (stack * (_relative(weights, stack) / len(weights))).sum(0)
    count, rows, cols = stack.shape
    k = max(1, min(rows, cols) // count)
    u, s, vh = svd(stack, full_matrices=False)
    rel = _relative(weights, s[:, :1]).view(-1, 1)
    u_cat = torch.cat(list(u[:, :, :k].unbind(0)), dim=1)  # (m, N k)
    v_cat = torch.cat(list(vh[:, :k, :].transpose(-2, -1).unbind(0)), dim=1)  # (n, N k)
    s_cat = (s[:, :k] * rel).reshape(-1)
    return float(lam) * (polar_svd(u_cat) * s_cat) @ polar_svd(v_cat).T
