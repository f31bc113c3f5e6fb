"""Repetition penalties on the engine's candidates: OpenAI's `frequency_penalty` and `presence_penalty` and vLLM's
`repetition_penalty`, applied as vLLM applies them, to the K candidates of each position a row predicts.

- `repetition_penalty` r (in (0, 2], 1 = off): a candidate that occurs in the prompt or in the answer before it has
  its logit divided by r when positive, multiplied by r otherwise;
- then `frequency_penalty` f and `presence_penalty` p (each in [-2, 2], 0 = off): a candidate that occurs c times in
  the answer before it loses f·c + p·[c > 0] from its logit.

The adjusted logits decide the choice (greedy, or sampled at the temperature among the candidates after `top_k`
and `top_p`); the log probs reported stay the model's. Exact within the K candidates: a token outside them is not
seen, so a negative penalty cannot promote it.

"The answer before it" is what the position's prediction is conditioned on: for a causal prediction (`ar`, the
prefill, speculative verification, the pass that writes a diffusion block) the answer's tokens before the target
position, drafts included, so speculative decoding with penalties still equals `ar` with the same penalties at
temperature 0; for a bidirectional prediction (diffusion denoising, speculative drafting) every answer token
committed so far, on either side of it. Nothing here scales with the vocabulary: counts come from a sorted copy of
the history and a comparison with at most one block of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FREQUENCY_RANGE = (-2.0, 2.0)
PRESENCE_RANGE = (-2.0, 2.0)
REPETITION_RANGE = (0.0, 2.0)  # exclusive of 0


def check(frequency_penalty: float, presence_penalty: float, repetition_penalty: float) -> None:
    """Raise ValueError naming the penalty out of its range (NaN and infinities fail)."""
    for name, value, (low, high) in (("frequency_penalty", frequency_penalty, FREQUENCY_RANGE),
                                     ("presence_penalty", presence_penalty, PRESENCE_RANGE)):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    if not REPETITION_RANGE[0] < repetition_penalty <= REPETITION_RANGE[1]:
        raise ValueError(f"repetition_penalty must be in ({REPETITION_RANGE[0]:g}, {REPETITION_RANGE[1]:g}], "
                         f"got {repetition_penalty}")


@dataclass(frozen=True)
class History:
    """What one row's predictions are conditioned on: `answer` tokens (mask ids already removed where a
    bidirectional row sees them), of which the prediction at position m sees the first `visible[m]`, and the
    prompt's distinct tokens, sorted (for `repetition_penalty`)."""

    answer: np.ndarray  # [L] int64
    visible: np.ndarray  # [n] int64, each in [0, L]
    prompt: np.ndarray  # sorted distinct prompt ids


def _occurrences(candidates: np.ndarray, history: History) -> np.ndarray:
    """[n, K] count of each candidate among the answer tokens its position sees."""
    shared = int(history.visible.min()) if len(history.visible) else 0
    base = np.sort(history.answer[:shared])
    counts = (np.searchsorted(base, candidates, side="right") - np.searchsorted(base, candidates, side="left"))
    tail = history.answer[shared : int(history.visible.max(initial=shared))]  # at most a block: compared directly
    if len(tail):
        seen = np.arange(shared, shared + len(tail))[None, :] < history.visible[:, None]  # [n, tail]
        counts = counts + ((candidates[:, :, None] == tail[None, None, :]) & seen[:, None, :]).sum(axis=-1)
    return counts.astype(np.int64)


def _in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    if not len(sorted_ids):
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[at] == values


def apply(logits: np.ndarray, candidates: np.ndarray, history: History, frequency_penalty: float,
          presence_penalty: float, repetition_penalty: float) -> np.ndarray:
    """`logits [n, K]` of `candidates [n, K]` after the penalties, as float32 (a copy)."""
    out = logits.astype(np.float32, copy=True)
    counts = _occurrences(candidates, history)
    if repetition_penalty != 1.0:
        seen = (counts > 0) | _in_sorted(candidates, history.prompt)
        r = np.float32(repetition_penalty)
        out = np.where(seen, np.where(out > 0, out / r, out * r), out)
    if frequency_penalty:
        out = out - np.float32(frequency_penalty) * counts.astype(np.float32)
    if presence_penalty:
        out = out - np.float32(presence_penalty) * (counts > 0).astype(np.float32)
    return out.astype(np.float32)
