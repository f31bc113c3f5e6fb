"""The pass planner: which rows of a step share an engine pass, so that every pass fits the artifact.

A pass pads its rows to the longest row's tokens (T) and reads up to the longest row's cache (P), so rows that each
fit can fail together (P + T beyond the context), and a long prefill next to one-token rows is mostly padding. The
planner groups rows into passes of the same step such that each pass keeps B ≤ max batch, T ≤ max tokens,
P + T ≤ max context, B × T ≤ the per-pass token budget (TensorRT-LLM's `max_num_tokens`), and at most
`MAX_PADDING` of its tokens padding. Prompts longer than one chunk are prefilled in chunks (causal passes with
P > 0), a fixed `chunk` tokens per pass whatever else is running, so a request's tokens do not depend on its
neighbours (batch invariance) and a long prompt neither fails nor stalls the others for long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_PADDING = 0.25  # largest share of a pass's tokens that may be padding when rows of other sizes join it


@dataclass(frozen=True)
class PassLimits:
    max_batch: int  # rows per pass
    max_tokens: int  # new tokens per row and pass (T)
    max_context: int  # P + T
    max_block: int  # positions one row may predict from (N): the longest block
    token_budget: int  # B × T per pass, padding included

    def __post_init__(self) -> None:
        if self.token_budget < self.max_block:
            raise ValueError(
                f"the per-pass token budget ({self.token_budget}) must hold at least one block of the longest "
                f"length this artifact allows ({self.max_block}); raise max_num_tokens"
            )

    @classmethod
    def from_profile(cls, profile: Any, token_budget: int | None = None) -> "PassLimits":
        """From an artifact's `dlm.contract.Profile`; the budget defaults to one longest prefill."""
        budget = token_budget or profile.tokens[2]
        return cls(profile.batch[2], profile.tokens[2], profile.max_context, profile.max_block, budget)

    @property
    def chunk(self) -> int:
        """Prompt tokens per prefill pass."""
        return min(self.token_budget, self.max_tokens)


@dataclass
class _Pass:
    rows: list[int]
    tokens: int  # T: the longest row
    past: int  # P: the longest cache
    real: int  # tokens that are not padding


def group_rows(sizes: list[tuple[int, int]], limits: PassLimits) -> list[list[int]]:
    """Rows (each `(tokens, cache_length)`) grouped into passes within `limits`; the indices of each pass, longer
    rows first. Every single row must fit on its own (admission guarantees it)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], i))
    passes: list[_Pass] = []
    for i in order:
        t, p = sizes[i]
        for candidate in passes:
            b, width = len(candidate.rows) + 1, max(candidate.tokens, t)
            if (b <= limits.max_batch and b * width <= limits.token_budget
                    and max(candidate.past, p) + width <= limits.max_context
                    and candidate.real + t >= (1 - MAX_PADDING) * b * width):
                candidate.rows.append(i)
                candidate.tokens, candidate.past, candidate.real = width, max(candidate.past, p), candidate.real + t
                break
        else:
            if t > limits.max_tokens or p + t > limits.max_context or t > limits.token_budget:
                raise ValueError(f"a row of {t} tokens after {p} cached positions cannot run in any pass of {limits}")
            passes.append(_Pass([i], t, p, t))
    return [candidate.rows for candidate in passes]
