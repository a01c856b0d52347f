"""Evaluation of a causal LM on the synthetic tasks and on held-out "language" text.

- Task accuracy ``<task>``: the fraction of answer symbols predicted right under teacher forcing
  (the argmax at each answer position, given the true prefix, equals the answer symbol), on a
  fixed held-out set drawn with its own seed. ``<task>:em`` is the exact match of the whole
  answer (all symbols right), a harsher score that is often 0 for merged models at this scale;
  both are reported, the per-symbol accuracy is the one averaged in the tables.
- Retention: mean cross-entropy (nats/token) of held-out Markov "language" text, the analogue of
  the paper's out-of-domain columns (lower is better); also reported as next-token accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import data

EVAL_SEED_OFFSET = 10_000


class Evaluator:
    """Callable ``model -> {task: acc, task:em: exact match, ..., "lm_loss", "lm_acc"}`` on fixed sets."""

    def __init__(self, tasks: Sequence[str], seed: int, n: int = 512) -> None:
        gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
        self.tasks = list(tasks)
        self.sets = {t: data.task_batch(t, n, gen, seed) for t in self.tasks}
        self.lm = data.lm_batch(n, gen, seed)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        scores: dict[str, float] = {}
        lo, hi = data.ANSWER_START, data.ANSWER_START + data.SEQ_LEN
        for task, batch in self.sets.items():
            logits = model(input_ids=batch.input_ids).logits
            pred = logits[:, lo - 1 : hi - 1].argmax(-1)
            hit = pred == batch.input_ids[:, lo:hi]
            scores[task] = float(hit.float().mean())
            scores[f"{task}:em"] = float(hit.all(dim=1).float().mean())
        logits = model(input_ids=self.lm.input_ids).logits[:, :-1].float()
        labels = self.lm.labels[:, 1:]
        mask = labels != -100
        scores["lm_loss"] = float(torch.nn.functional.cross_entropy(logits[mask], labels[mask]))
        scores["lm_acc"] = float((logits[mask].argmax(-1) == labels[mask]).float().mean())
        return scores
