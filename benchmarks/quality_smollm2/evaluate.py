"""Scores for the SmolLM2 replica: per-task answer accuracy and retention of the base's behaviour.

- ``token_accuracy``: teacher-forced accuracy of the answer tokens on held-out examples (fast);
- ``exact_match``: greedy generation of the answer, compared as a string (slower, the real score);
- ``retention_kl``: mean KL(base || model) of the next-token distributions over held-out prompts of
  every task (no text corpus needed: the base's own predictions are the reference).
"""

from __future__ import annotations

import torch

from . import tasks


@torch.no_grad()
def token_accuracy(model, tokenizer, task: str, n: int = 64, seed: int = 0) -> float:
    hits = total = 0
    for prompt, answer in tasks.examples(task, n, seed, split="test"):
        ids, start = tasks.encode(tokenizer, prompt, answer)
        logits = model(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]
        target = torch.tensor(ids[start:])
        hits += int((logits.argmax(-1) == target).sum())
        total += len(target)
    return hits / total


@torch.no_grad()
def exact_match(model, tokenizer, task: str, n: int = 32, seed: int = 0, max_new_tokens: int = 16) -> float:
    hits = 0
    for prompt, answer in tasks.examples(task, n, seed, split="test"):
        ids, _ = tasks.encode(tokenizer, prompt)
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        hits += int(text == answer)
    return hits / n


@torch.no_grad()
def retention_kl(model, base_model, tokenizer, n_per_task: int = 8, seed: int = 0) -> float:
    values = []
    for task in tasks.TASKS:
        for prompt, _ in tasks.examples(task, n_per_task, seed, split="test"):
            ids = torch.tensor([tasks.encode(tokenizer, prompt)[0]])
            p = torch.log_softmax(base_model(ids).logits.double(), -1)
            q = torch.log_softmax(model(ids).logits.double(), -1)
            values.append(float((p.exp() * (p - q)).sum(-1).mean()))
    return sum(values) / len(values)
