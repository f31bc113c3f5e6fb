"""Synthetic tasks with checkable answers: what the miniature is trained on and what the quality harness scores.

- `addition`: `A+B=` followed by the sum, A and B of up to 4 digits.
- `upper`: `upper:<36 lowercase letters>=` followed by the same letters in upper case: answers of 37 tokens with
  the end token, every position decidable from the prompt alone, the regime where parallel decoding pays.

Held-out problems never appear in training: an addition pair is held out when `(31 * A + B) % 50 == 0`; the `upper` test set
comes from a random stream training never draws from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("addition", "upper")
UPPER_LENGTH = 36
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def _is_held_out(task: str, a: int, b: int = 0) -> bool:
    if task == "addition":
        return (31 * a + b) % 50 == 0
    return False


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 4)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def sample(task: str, rng: random.Random, held_out: bool) -> Problem:
    """One problem of `task`, from the held-out split or the training split."""
    while True:
        if task == "addition":
            a, b = _operand(rng), _operand(rng)
            if _is_held_out(task, a, b) == held_out:
                return Problem(task, f"{a}+{b}=", str(a + b))
        elif task == "upper":
            text = "".join(rng.choice(LETTERS) for _ in range(UPPER_LENGTH))
            return Problem(task, f"upper:{text}=", text.upper())
        else:
            raise ValueError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")


def held_out_set(task: str, count: int, seed: int = 1234) -> list[Problem]:
    """A fixed list of held-out problems (the upper task uses a stream training never draws from)."""
    rng = random.Random(f"held-out/{task}/{seed}")
    return [sample(task, rng, held_out=True) for _ in range(count)]
