"""Synthetic tasks with checkable answers: what the miniature is trained on and what the quality harness scores.

- `addition`: `A+B=` followed by the sum, A and B of up to 4 digits.
- `upper`: `upper:<36 lowercase letters>=` followed by the same letters in upper case: answers of 37 tokens with
  the end token, every position decidable from the prompt alone, the regime where parallel decoding pays.
- `spell`: `spell:N=` followed by N written in English words (0 to 999): a short text-like answer.

Held-out problems never appear in training: an addition pair is held out when `(31 * A + B) % 50 == 0`; `upper` and
`spell` test sets come from their own random stream and `spell` holds out every number divisible by 7.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("addition", "upper", "spell")
UPPER_LENGTH = 36
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _is_held_out(task: str, a: int, b: int = 0) -> bool:
    if task == "addition":
        return (31 * a + b) % 50 == 0
    if task == "spell":
        return a % 7 == 0
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
        elif task == "spell":
            n = rng.randint(0, 999)
            if _is_held_out(task, n) == held_out:
                return Problem(task, f"spell:{n}=", number_words(n))
        else:
            raise ValueError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")


def held_out_set(task: str, count: int, seed: int = 1234) -> list[Problem]:
    """A fixed list of held-out problems (the upper task uses a stream training never draws from)."""
    if task == "spell":  # every held-out number once
        return [Problem(task, f"spell:{n}=", number_words(n)) for n in range(0, 1000, 7)][:count]
    rng = random.Random(f"held-out/{task}/{seed}")
    return [sample(task, rng, held_out=True) for _ in range(count)]
