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
  mean (no magnitude trim; ``lam`` 1.0). Seeded: ``generator``, else ``torch.Generator`` seeded
  with ``seed`` (0), so results are reproducible.
- ``"tsvm"`` (TSV-M): per matrix ``(m, n)`` each task keeps its top ``k = max(1, min(m, n) // N)``
  singular triplets (singular values scaled by ``N w_i``); the concatenated ``U`` and ``V`` are
  replaced by their polar factors; merged ``= lam * U diag(S) V^T`` with ``lam`` 1.0. 1-D (and
  other non-matrix) tensors fall back to ``lam`` times the weighted mean.

``"ta"`` and ``"dare_ta"`` are registered ``linear``: they accept any iterable of task vectors
and consume it one at a time (see `registry.merge_iter`); the others stack their inputs.

Magnitude trimming (`trim_magnitude`) is PEFT's `peft.utils.merge_utils.magnitude_based_pruning`
(top-k by ``torch.topk``) except that it keeps at least one entry; sign election and disjoint mean
follow PEFT's helpers, written task by task (`_sign_elect_mean`). `ops.streamed` has the same
methods with one task vector alive at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated

import torch

from ..errors import ConfigError
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


def trim_magnitude_(x: torch.Tensor, density: float) -> torch.Tensor:
    """`trim_magnitude` in place: ``x`` with all but its top ``k`` entries by magnitude set to 0."""
    if density >= 1:
        return x
    flat = x.view(-1)
    k = min(flat.numel(), max(1, int(density * flat.numel())))
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat.abs(), k=k, largest=True).indices] = True
    return x.masked_fill_(keep.logical_not_().view(x.shape), 0)


def trim_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim of one task vector: a new tensor keeping its top ``k = max(1, int(density * numel))``
    entries by magnitude (``torch.topk``, as PEFT's ``magnitude_based_pruning``, which keeps none when
    ``density * numel < 1``), zeros (+0.0) elsewhere; ``x`` itself when ``density >= 1``."""
    return x if density >= 1 else trim_magnitude_(x.clone(memory_format=torch.contiguous_format), density)


def seeded_generator(generator: torch.Generator | None, seed: int, device: torch.device) -> torch.Generator:
    """``generator``, else a new ``torch.Generator`` on ``device`` seeded with ``seed``."""
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


def _sign_elect_mean(stack: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election (summed weighted mass) and disjoint mean over agreeing non-zero entries.

    The same formula as PEFT's ``calculate_majority_sign_mask(method="total")`` + ``disjoint_merge``
    (ties to the sign go to +), computed task by task so that no second stack-sized tensor exists.
    ``stack`` (the caller's own copy) is overwritten with the weighted task vectors."""
    weighted = stack.mul_(_relative(weights, stack))
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    total = torch.zeros_like(majority)
    count = torch.zeros_like(majority)
    for task in weighted:
        agree = (task.sign() == majority).to(task.dtype)  # sign 0 (a dropped / trimmed entry) never agrees
        total.addcmul_(task, agree)
        count.add_(agree)
        del agree
    return total.div_(count.clamp_(min=1.0))


def _weighted_sum(task_vectors: Iterable[torch.Tensor], weights: Sequence[float], transform=None) -> torch.Tensor:
    """``sum_i (N w_i) transform(tau_i)``, consuming ``task_vectors`` once, in order: only the
    accumulator and the current term are alive (a generator of task vectors streams)."""
    count = len(weights)
    acc: torch.Tensor | None = None
    seen = 0
    for tau in task_vectors:
        if seen >= count:
            raise ConfigError(f"got {count} weights for more task vectors")
        term = tau if transform is None else transform(tau)
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
    return float(lam) * _sign_elect_mean(stack, weights)


def dare_drop(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """DARE on one task vector ``x``: keep each entry with probability ``1 - p``, rescale by ``1/(1-p)``."""
    keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float64) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def _dare_drop(stack: torch.Tensor, p: float, generator: torch.Generator | None, seed: int) -> torch.Tensor:
    """DARE on each task of ``stack`` (overwritten), masks drawn task by task as in `dare_ta`."""
    p = DROP.check("p", p)
    if p == 0:
        return stack
    gen = seeded_generator(generator, seed, stack.device)
    for i in range(stack.shape[0]):
        stack[i] = dare_drop(stack[i], p, gen)
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

    Linear: the masks are drawn task by task from one generator (on the CPU the same numbers as
    one draw for the stacked tasks, which `dare_ties` makes), so ``task_vectors`` may be any
    iterable, consumed one at a time."""
    p = DROP.check("p", p)
    lam = _ta_lam(len(weights), lam)
    gen: list[torch.Generator] = []  # created on the first task vector's device

    def drop(tau: torch.Tensor) -> torch.Tensor:
        if p == 0:
            return tau
        if not gen:
            gen.append(seeded_generator(generator, seed, tau.device))
        return dare_drop(tau, p, gen[0])

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
    """DARE + TIES, per tensor: drop ``p`` (0.5) and rescale, sign election, disjoint mean, ``lam`` (1.0)."""
    stack = _dare_drop(_stack(task_vectors, weights), p, generator, seed)
    return float(lam) * _sign_elect_mean(stack, weights)


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
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    rel = _relative(weights, s[:, :1]).view(-1, 1)
    u_cat = torch.cat(list(u[:, :, :k].unbind(0)), dim=1)  # (m, N k)
    v_cat = torch.cat(list(vh[:, :k, :].transpose(-2, -1).unbind(0)), dim=1)  # (n, N k)
    s_cat = (s[:, :k] * rel).reshape(-1)
    return float(lam) * (polar_svd(u_cat) * s_cat) @ polar_svd(v_cat).T
