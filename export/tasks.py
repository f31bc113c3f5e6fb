"""Synthetic tasks with checkable answers: what the miniature is trained on and what the quality harness scores.

- `addition`: `A+B=` followed by the sum, A and B of up to 4 digits.
- `upper`: `upper:<1 to 48 lowercase letters>=` followed by the same letters in upper case, every position
  decidable from the prompt alone, the regime where parallel decoding pays. The held-out set (the long-answer
  benchmark) keeps 36 letters: answers of 37 tokens with the end token.

Held-out problems never appear in training: an addition pair is held out when `(31 * A + B) % 50 == 0`; the `upper` test set
comes from a random stream training never draws from. Every held-out sum ends in 0 (`A + B = 31A + B - 30A`), so
all but a few of the held-out additions carry out of the units column: a harder set than uniform pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("addition", "upper")
UPPER_LENGTH = 36  # the held-out set's (the long-answer benchmark's) length
UPPER_LENGTHS = (1, 48)  # training draws any length in this range
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


def _carrying_operand(rng: random.Random, other: int) -> int:
    """An operand whose digits mostly sum with `other`'s aligned digits to 9 or more: carries and carry chains,
    what digit-by-digit addition written most significant digit first gets wrong."""
    digits = rng.randint(1, 4)
    theirs = str(other)[::-1]
    out = []
    for i in range(digits):
        low = 1 if i == digits - 1 and digits > 1 else 0
        if i < len(theirs) and rng.random() < 0.7:
            low = max(low, 9 - int(theirs[i]))
        out.append(rng.randint(low, 9))
    return int("".join(map(str, out[::-1])))


def _boundary_operand(rng: random.Random, other: int) -> int:
    """An operand whose digits mostly sum with `other`'s aligned digits to exactly 9 or 10: the cases that tell a
    carry from none (9 + a carry in carries on, 9 alone does not; 10 carries whatever comes in)."""
    digits = rng.randint(1, 4)
    theirs = str(other)[::-1]
    out = []
    for i in range(digits):
        low = 1 if i == digits - 1 and digits > 1 else 0
        digit = rng.randint(low, 9)
        if i < len(theirs) and rng.random() < 0.8:
            digit = rng.choice((9, 10)) - int(theirs[i])
            digit = digit if low <= digit <= 9 else rng.randint(low, 9)
        out.append(digit)
    return int("".join(map(str, out[::-1])))


def sample(
    task: str, rng: random.Random, held_out: bool, carry_rich: float = 0.0, length: int | None = None,
    boundary: float = 0.0,
) -> Problem:
    """One problem of `task`, from the held-out split or the training split. `carry_rich`: the share of additions
    drawn with carrying digits, `boundary`: the share drawn with digit pairs summing to exactly 9 or 10 (training's
    curriculum); `length`: the upper-casing's letters (default: the held-out set's 36)."""
    while True:
        if task == "addition":
            a = _operand(rng)
            if boundary and rng.random() < boundary:
                b = _boundary_operand(rng, a)
                if rng.random() < 0.5:
                    a, b = b, a
            elif carry_rich and rng.random() < carry_rich:
                b = _carrying_operand(rng, a)
                if rng.random() < 0.5:
                    a, b = b, a
            else:
                b = _operand(rng)
            if _is_held_out(task, a, b) == held_out:
                return Problem(task, f"{a}+{b}=", str(a + b))
        elif task == "upper":
            text = "".join(rng.choice(LETTERS) for _ in range(length or UPPER_LENGTH))
            return Problem(task, f"upper:{text}=", text.upper())
        else:
            raise ValueError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")


def held_out_set(task: str, count: int, seed: int = 1234) -> list[Problem]:
    """A fixed list of held-out problems (the upper task uses a stream training never draws from)."""
    rng = random.Random(f"held-out/{task}/{seed}")
    return [sample(task, rng, held_out=True) for _ in range(count)]
