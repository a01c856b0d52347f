"""Seeded, verifiable chat tasks for the SmolLM2 replica (no data set download).

Each task turns a generator into ``(prompt, answer)`` pairs; the prompt goes through the
tokenizer's chat template as a user turn and the answer is the assistant turn, so training and
scoring use the model's own format. Answers are short and checkable by string equality:

- ``add``: "What is 37 + 58?" -> "95"
- ``reverse``: "Reverse the order of these words: cat sun box" -> "box sun cat"
- ``sort``: "Sort these numbers from smallest to largest: 9 2 7" -> "2 7 9"
- ``upper``: "Write this word in capital letters: planet" -> "PLANET"
- ``count``: "How many times does the letter a appear in banana?" -> "3"

Held-out examples (``split="test"``) use another seed stream and, for the word tasks, words never
seen in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable

WORDS = [
    "cat",
    "sun",
    "box",
    "tree",
    "river",
    "stone",
    "cloud",
    "bread",
    "lamp",
    "door",
    "apple",
    "chair",
    "music",
    "paper",
    "garden",
    "window",
    "planet",
    "silver",
    "dragon",
    "orange",
    "yellow",
    "forest",
    "candle",
    "bottle",
    "pocket",
    "rocket",
    "button",
    "castle",
    "mirror",
]
TASKS = ("add", "reverse", "sort", "upper", "count")
REPLICA_TASKS = ("add", "reverse", "sort", "upper")  # the trained set: `count` is left out (see RESULTS.md)
SPLIT_SEEDS = {"train": 0, "test": 1_000_003}


def _add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _reverse(rng: random.Random, words: list[str]) -> tuple[str, str]:
    words = rng.sample(words, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng: random.Random, words: list[str]) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"Sort these numbers from smallest to largest: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


def _upper(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    return f"Write this word in capital letters: {word}", word.upper()


def _count(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    letter = rng.choice(sorted(set(word)))
    return f"How many times does the letter {letter} appear in {word}?", str(word.count(letter))


MAKERS: dict[str, Callable[[random.Random, list[str]], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
}


def examples(task: str, n: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """``n`` deterministic ``(prompt, answer)`` pairs of ``task`` for ``split`` ("train" or "test")."""
    if task not in MAKERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}/{seed + SPLIT_SEEDS[split]}")
    words = list(WORDS[0::2] if split == "train" else WORDS[1::2])  # word tasks: disjoint vocabularies
    return [MAKERS[task](rng, words) for _ in range(n)]


def encode(tokenizer, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of the chat-formatted example and the index where the answer starts.

    Without ``answer``: the prompt with the generation prompt (for scoring by generation)."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    if answer is None:
        return head_ids, len(head_ids)
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    return head_ids + answer_ids, len(head_ids)
