"""Seeded synthetic sequence tasks for the small-scale replica.

Every example is a fixed-length token sequence (no padding)::

    [BOS, TASK, x_1 .. x_L, SEP, y_1 .. y_L, EOS]        (a task example)
    [BOS, LM,   s_1 .. s_{2L+2}]                         (pretraining "language" text)

with ``L = SEQ_LEN`` symbols drawn from an alphabet of ``N_SYMBOLS`` tokens. The five tasks are
chosen to need different mechanisms of a small transformer (position lookup, order reversal,
comparison, two-token arithmetic, a fixed token map), so that their adapters pull the base model
in different directions, as distinct fine-tuning domains do in the paper:

- ``copy``: ``y = x``
- ``reverse``: ``y = x[::-1]``
- ``sort``: ``y = sorted(x)``
- ``modadd``: ``y_i = (x_i + x_{i-1}) mod N_SYMBOLS`` with ``x_0 = 0`` (running pairwise sum)
- ``cipher``: ``y_i = pi(x_i)`` for one fixed random permutation ``pi`` of the alphabet

The "language" text is a sparse first-order Markov chain over the alphabet (every symbol has a
few likely successors). The base model is pretrained on a mixture of language text and (briefly)
the five tasks; held-out language text is the analogue of the paper's out-of-domain columns:
fine-tuning on one task tends to damage it, and a merge should preserve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
TASKS = ("reverse", "sort", "modadd", "cipher", "copy")  # also the order in which tasks are added (Figure 5)
TASK_TOKEN = {name: 4 + i for i, name in enumerate(TASKS)}
LM_TOKEN = 4 + len(TASKS)
SYMBOL0 = LM_TOKEN + 1
N_SYMBOLS = 16
SEQ_LEN = 6
VOCAB_SIZE = 32
TOTAL_LEN = 2 * SEQ_LEN + 4
ANSWER_START = SEQ_LEN + 3  # index of y_1 in the sequence
assert SYMBOL0 + N_SYMBOLS <= VOCAB_SIZE


@dataclass
class Batch:
    """``input_ids`` (B, T); ``labels`` (B, T) with -100 on positions that are not scored."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def _cipher_perm(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(N_SYMBOLS, generator=g)


def _markov_matrix(seed: int) -> torch.Tensor:
    """Row-stochastic transition matrix: 3 likely successors per symbol plus a little noise."""
    g = torch.Generator().manual_seed(seed + 104729)
    probs = torch.full((N_SYMBOLS, N_SYMBOLS), 0.02)
    for s in range(N_SYMBOLS):
        succ = torch.randperm(N_SYMBOLS, generator=g)[:3]
        probs[s, succ] += torch.tensor([0.5, 0.3, 0.15])
    return probs / probs.sum(dim=1, keepdim=True)


def task_answer(task: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The answer symbols (0-based, shape like ``x`` = (B, L)) of ``task`` for inputs ``x``."""
    if task == "copy":
        return x.clone()
    if task == "reverse":
        return x.flip(1)
    if task == "sort":
        return x.sort(dim=1).values
    if task == "modadd":
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return (x + prev) % N_SYMBOLS
    if task == "cipher":
        return _cipher_perm(seed)[x]
    raise ValueError(f"unknown task {task!r}")


def task_batch(task: str, n: int, generator: torch.Generator, seed: int) -> Batch:
    """``n`` examples of ``task``; only the answer symbols and EOS are scored."""
    x = torch.randint(0, N_SYMBOLS, (n, SEQ_LEN), generator=generator)
    y = task_answer(task, x, seed)

    def col(v):
        return torch.full((n, 1), v, dtype=torch.long)

    ids = torch.cat([col(BOS), col(TASK_TOKEN[task]), x + SYMBOL0, col(SEP), y + SYMBOL0, col(EOS)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, ANSWER_START:] = ids[:, ANSWER_START:]
    return Batch(ids, labels)


def lm_batch(n: int, generator: torch.Generator, seed: int) -> Batch:
    """``n`` sequences of Markov-chain "language" text; every symbol after the first is scored."""
    trans = _markov_matrix(seed)
    length = TOTAL_LEN - 2
    s = torch.empty((n, length), dtype=torch.long)
    s[:, 0] = torch.randint(0, N_SYMBOLS, (n,), generator=generator)
    for t in range(1, length):
        s[:, t] = torch.multinomial(trans[s[:, t - 1]], 1, generator=generator).squeeze(1)
    ids = torch.cat([torch.full((n, 1), BOS), torch.full((n, 1), LM_TOKEN), s + SYMBOL0], dim=1)
    labels = ids.clone()
    labels[:, :3] = -100
    return Batch(ids, labels)


def mixture_batch(n: int, generator: torch.Generator, seed: int, task_fraction: float, tasks=TASKS) -> Batch:
    """Pretraining mixture: ``task_fraction`` of the rows are task examples (tasks uniform)."""
    n_task = round(n * task_fraction)
    parts = [lm_batch(n - n_task, generator, seed)] if n - n_task else []
    if n_task:
        which = torch.randint(0, len(tasks), (n_task,), generator=generator)
        for i, task in enumerate(tasks):
            k = int((which == i).sum())
            if k:
                parts.append(task_batch(task, k, generator, seed))
    ids = torch.cat([p.input_ids for p in parts])
    labels = torch.cat([p.labels for p in parts])
    perm = torch.randperm(ids.shape[0], generator=generator)
    return Batch(ids[perm], labels[perm])
