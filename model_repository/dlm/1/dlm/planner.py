"""The pass planner: which rows of a step share an engine pass, so that every pass fits the artifact.

A pass pads its rows to the longest row's tokens (T) and reads up to the longest row's cache (P), so rows that each
fit can fail together (P + T beyond the context), and a long prefill next to one-token rows is mostly padding. The
planner groups rows into passes of the same step such that each pass keeps B ≤ max batch, T ≤ max tokens,
P + T ≤ max context, B × T ≤ the per-pass token budget (TensorRT-LLM's `max_num_tokens`), and at most
`MAX_PADDING` of its tokens padding. Prompts longer than one chunk are prefilled in chunks (causal passes with
P > 0), a fixed `chunk` tokens per pass whatever else is running, so a request's tokens do not depend on its
neighbours (batch invariance) and a long prompt neither fails nor stalls the others for long; a step runs its
passes fewest tokens first.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    prefill_chunk: int | None = None  # prompt tokens per prefill pass (None: the budget)

    def __post_init__(self) -> None:
        if self.token_budget < self.max_block:
            raise ValueError(
                f"the per-pass token budget ({self.token_budget}) must hold at least one block of the longest "
                f"length this artifact allows ({self.max_block}); raise max_num_tokens"
            )

        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")

    @classmethod
    def from_profile(cls, profile: Any, token_budget: int | None = None,
                     prefill_chunk: int | None = None) -> "PassLimits":
        """From an artifact's `dlm.contract.Profile`; the budget defaults to one longest prefill."""
        budget = token_budget or profile.tokens[2]
        return cls(profile.batch[2], profile.tokens[2], profile.max_context, profile.max_block, budget, prefill_chunk)

    @property
    def chunk(self) -> int:
        """Prompt tokens per prefill pass: `prefill_chunk`, within the budget and the artifact's token axis. A
        smaller chunk than the budget bounds how long the others' passes wait behind a long prompt's."""
        return min(self.prefill_chunk or self.token_budget, self.token_budget, self.max_tokens)


@dataclass
class _Pass:
    kind: int  # 1: chunks of long prompts that go on after them; 0: every other row
    rows: list[int]  # the sequences in it
    batch: int  # B: their rows
    tokens: int  # T: the longest row
    past: int  # P: the longest cache
    real: int  # tokens that are not padding


def group_rows(sizes: Sequence[tuple[int, ...]], limits: PassLimits) -> list[list[int]]:
    """Sequences (each `(tokens, cache_length[, rows[, kind[, real]]])`: a sequence may bring several rows to a
    pass, `tokens` its widest and `real` their tokens in all (default rows × tokens); kind 1 marks a chunk of a long
    prompt that goes on after it, 0 anything else) grouped into passes
    within `limits`; the indices of each pass. A long prompt's chunks never share a pass with the other rows, and
    the passes come fewest tokens first: a step runs its decoding passes and short prompts before a long prompt's
    chunk, so they never wait for more than the chunk of the step before (on a CPU a pass costs in proportion to
    its tokens; the order changes no request's tokens). Every single sequence must fit on its own (admission and
    `refine.plan_step` guarantee it)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], i))
    passes: list[_Pass] = []
    for i in order:
        t, p = sizes[i][0], sizes[i][1]
        k = sizes[i][2] if len(sizes[i]) > 2 else 1
        kind = sizes[i][3] if len(sizes[i]) > 3 else 0
        real = sizes[i][4] if len(sizes[i]) > 4 else k * t  # rows of one sequence may be shorter than its widest
        for candidate in passes:
            if candidate.kind != kind:
                continue
            b, width = candidate.batch + k, max(candidate.tokens, t)
            if (b <= limits.max_batch and b * width <= limits.token_budget
                    and max(candidate.past, p) + width <= limits.max_context
                    and candidate.real + real >= (1 - MAX_PADDING) * b * width):
                candidate.rows.append(i)
                candidate.batch += k
                candidate.tokens, candidate.past = width, max(candidate.past, p)
                candidate.real += real
                break
        else:
            if (t > limits.max_tokens or p + t > limits.max_context or k * t > limits.token_budget
                    or k > limits.max_batch):
                raise ValueError(f"{k} row(s) of {t} tokens after {p} cached positions cannot run in any pass of "
                                 f"{limits}")
            passes.append(_Pass(kind, [i], k, t, p, real))
    passes.sort(key=lambda candidate: (candidate.tokens, candidate.batch))
    return [candidate.rows for candidate in passes]
