"""Scores for the SmolLM2 replica: per-task accuracy and retention of the base's abilities.

`Evaluator.scores(model, tasks)` returns, for a causal LM in eval mode:

- ``<task>``: greedy exact match of the answer on ``n_test`` (24) held-out prompts of the task (the
  prompt through the chat template, the generated assistant turn stripped and compared as a string);
- ``<task>@tok``: teacher-forced accuracy of the answer tokens on the same prompts (a smoother
  signal of the same thing);
- ``ppl``: perplexity on real English text that ships with Python (``pydoc_data.topics``, the
  language reference: ``n_text`` windows of ``text_tokens`` tokens) -- retention of language
  modelling, lower is better;
- ``knowledge``: accuracy on the general-knowledge questions of `KNOWLEDGE` that the base answers
  right (the answer must appear in the greedy reply, case-insensitive) -- retention of what the
  instruction-tuned model knew, the analogue of the paper's out-of-domain columns.

Generation is batched with left padding (pad = ``<|im_end|>``); greedy decoding, so scores are
deterministic for a given model and torch build.
"""

from __future__ import annotations

import pydoc_data.topics

import torch

from . import tasks

# Simple questions with a short answer that the base (SmolLM2-135M-Instruct, greedy) answers right:
# the retention set. Of 20 candidates the base got 13; the 7 it missed (the capitals of Italy and
# Spain, the largest planet, water's freezing point, the king of the jungle, what bees make, Egypt's
# continent) were removed, so the base scores 1.0 by construction.
KNOWLEDGE: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of England?", "London"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("How many days are in a week?", "seven"),
    ("What colour is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the opposite of hot?", "cold"),
    ("What language is spoken in Brazil?", "Portuguese"),
)
SYNONYMS = {"seven": ("seven", "7")}


def _knowledge_hit(reply: str, answer: str) -> bool:
    reply = f" {reply.lower()} "
    return any(form.lower() in reply for form in SYNONYMS.get(answer, (answer,)))


def _text_windows(tokenizer, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of the language reference, taken evenly through the text."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stride = (len(ids) - length) // n
    return torch.tensor([ids[i * stride : i * stride + length] for i in range(n)])


class Evaluator:
    """Held-out prompts, text windows and knowledge questions, encoded once; `scores` runs them."""

    def __init__(self, tokenizer, n_test: int = 24, n_text: int = 16, text_tokens: int = 128, seed: int = 0):
        self.tokenizer = tokenizer
        self.examples = {t: tasks.examples(t, n_test, seed, split="test") for t in tasks.TASKS}
        self.text = _text_windows(tokenizer, n_text, text_tokens)
        self.knowledge = list(KNOWLEDGE)

    def _prompt_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` of the chat-formatted prompts."""
        encoded = [tasks.encode(self.tokenizer, p)[0] for p in prompts]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        return ids, mask

    @torch.no_grad()
    def generate(self, model, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy replies (special tokens dropped, stripped) to ``prompts``, in one batch."""
        ids, mask = self._prompt_batch(prompts)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]

    @torch.no_grad()
    def token_accuracy(self, model, task: str) -> float:
        """Teacher-forced accuracy of the answer tokens (``<|im_end|>`` included) of ``task``, in one
        right-padded batch (the padding comes after every scored position, so it changes nothing)."""
        encoded = [tasks.encode(self.tokenizer, p, a) for p, a in self.examples[task]]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.tensor([seq + [self.tokenizer.pad_token_id] * (width - len(seq)) for seq, _ in encoded])
        predicted = model(input_ids=ids).logits.argmax(-1)
        hits = total = 0
        for row, (seq, start) in enumerate(encoded):
            hits += int((predicted[row, start - 1 : len(seq) - 1] == ids[row, start : len(seq)]).sum())
            total += len(seq) - start
        return hits / total

    def exact_match(self, model, task: str) -> float:
        prompts, answers = zip(*self.examples[task], strict=True)
        width = max(len(self.tokenizer(a).input_ids) for a in answers) + 2
        replies = self.generate(model, list(prompts), width)
        return sum(r == a for r, a in zip(replies, answers, strict=True)) / len(answers)

    @torch.no_grad()
    def perplexity(self, model) -> float:
        """exp of the mean next-token cross-entropy over the text windows (4 windows per forward)."""
        nll = []
        for chunk in self.text.split(4):
            logits = model(input_ids=chunk).logits[:, :-1]
            nll.append(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
            )
        return float(torch.cat(nll).double().mean().exp())

    def knowledge_accuracy(self, model) -> float:
        questions, answers = zip(*self.knowledge, strict=True)
        replies = self.generate(model, list(questions), 24)
        return sum(_knowledge_hit(r, a) for r, a in zip(replies, answers, strict=True)) / len(answers)

    def scores(self, model, task_names: list[str] | tuple[str, ...]) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in task_names:
            out[task] = self.exact_match(model, task)
            out[f"{task}@tok"] = self.token_accuracy(model, task)
        out["ppl"] = self.perplexity(model)
        out["knowledge"] = self.knowledge_accuracy(model)
        return out
