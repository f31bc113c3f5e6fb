"""Token choice from the engine's candidates (engine contract v2, DESIGN §4).

A pass returns, at each position a row asked for, the K best token ids with their logits and the log-sum-exp over
the whole vocabulary (the mask id excluded inside the graph). From these, greedy choice and every confidence are
exact: p(token) = exp(logit - logsumexp). Sampling at temperature > 0 draws among the K candidates (a top-K
truncation), further cut by a request's `top_k` and `top_p`, with Gumbel noise in float64 from the request's own
seeded generator. Everything here works on [B, N, K] arrays; nothing scales with the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# (log prob of the chosen token, its best alternatives as (token id, log prob), best first)
Score = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class Candidates:
    """One pass's outputs besides the cache columns."""

    tokens: np.ndarray  # [B, N, K] int64, best first
    logits: np.ndarray  # [B, N, K] float32
    logsumexp: np.ndarray  # [B, N] float32

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray]) -> "Candidates":
        """From the graph's outputs by their contract names."""
        return cls(
            np.asarray(outputs["top_tokens"], dtype=np.int64),
            np.asarray(outputs["top_logits"], dtype=np.float32),
            np.asarray(outputs["logsumexp"], dtype=np.float32),
        )

    @property
    def k(self) -> int:
        return int(self.tokens.shape[-1])


class SamplingParams(Protocol):
    @property
    def temperature(self) -> float: ...

    @property
    def top_k(self) -> int | None: ...

    @property
    def top_p(self) -> float | None: ...


@dataclass(frozen=True)
class Picks:
    """The tokens chosen at the positions one row asked for, in the order it asked."""

    tokens: np.ndarray  # [n] int64: the choice (greedy at temperature 0, else a sample)
    log_probs: np.ndarray  # [n] float64: log p of each chosen token under the model (temperature 1)
    greedy: np.ndarray  # [n] int64: the best candidate, whatever the temperature
    candidate_tokens: np.ndarray  # [n, K]
    candidate_log_probs: np.ndarray  # [n, K]

    @property
    def confidence(self) -> np.ndarray:
        return np.exp(self.log_probs)

    def subset(self, rows: np.ndarray) -> "Picks":
        """The picks at some of the positions, in the order of `rows`."""
        return Picks(self.tokens[rows], self.log_probs[rows], self.greedy[rows], self.candidate_tokens[rows],
                     self.candidate_log_probs[rows])

    def score(self, j: int, alternatives: int) -> Score:
        """The log prob of the choice at `j` and the `alternatives` best candidates there."""
        ids = self.candidate_tokens[j, :alternatives].tolist()
        values = self.candidate_log_probs[j, :alternatives].tolist()
        return float(self.log_probs[j]), list(zip(ids, values))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Index of the sampled candidate at each of `logits [n, K]` (sorted best first): Gumbel-max over the
    candidates at the request's temperature, after its `top_k` and `top_p` cuts (top_p over the candidates'
    renormalised probabilities). The noise has the full [n, K] shape whatever the cuts, so a seed draws the same
    numbers under any setting."""
    x = logits.astype(np.float64) / params.temperature  # a candidate excluded by the caller is -inf
    k = x.shape[1]
    if params.top_k is not None and params.top_k < k:
        rank = np.cumsum(np.isfinite(x), axis=1)  # among the candidates still allowed
        x[rank > params.top_k] = -np.inf
    if params.top_p is not None and params.top_p < 1.0:
        probs = np.exp(x - x.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        before = np.cumsum(probs, axis=1) - probs  # mass of the better candidates; the best always stays
        x[before >= params.top_p] = -np.inf
    gumbel = -np.log(-np.log(rng.random(x.shape)))
    return np.argmax(x + gumbel, axis=1)


def pick(candidates: Candidates, rows: list[Any], counts: list[int], no_eos: np.ndarray | None = None,
         eos_ids: np.ndarray | None = None, scores: np.ndarray | None = None) -> list[Picks]:
    """The choice at the first `counts[i]` positions of each row i. `rows[i]` has `params` (temperature, top_k,
    top_p) and `rng`; only rows at temperature > 0 draw noise, each from its own generator. Where `no_eos [B, N]`
    is set, no id of `eos_ids` is chosen (K exceeds the number of end ids, so another candidate always remains).
    `scores [B, N, K]`, when given, replace the logits in the choice (penalised logits, `dlm.penalties`); the log
    probs stay the model's."""
    log_probs = candidates.logits.astype(np.float64) - candidates.logsumexp.astype(np.float64)[..., None]
    logits = candidates.logits if scores is None else scores
    if no_eos is not None and eos_ids is not None and len(eos_ids):
        excluded = no_eos[..., None] & np.isin(candidates.tokens, eos_ids)
        logits = np.where(excluded, np.float32(-np.inf), logits)
        best = np.argmax(logits, axis=-1)  # the best allowed candidate (they are sorted, so the first allowed)
    elif scores is not None:
        best = np.argmax(logits, axis=-1)  # penalties may reorder the candidates
    else:
        best = np.zeros(candidates.tokens.shape[:2], dtype=np.int64)
    chosen = best.copy()
    for i, (row, n) in enumerate(zip(rows, counts)):
        if row.params.temperature > 0:
            chosen[i, :n] = sample(logits[i, :n], row.params, row.rng)
    tokens = np.take_along_axis(candidates.tokens, chosen[..., None], axis=-1)[..., 0]
    chosen_log_probs = np.take_along_axis(log_probs, chosen[..., None], axis=-1)[..., 0]
    greedy = np.take_along_axis(candidates.tokens, best[..., None], axis=-1)[..., 0]
    return [
        Picks(tokens[i, :n], chosen_log_probs[i, :n], greedy[i, :n], candidates.tokens[i, :n], log_probs[i, :n])
        for i, n in enumerate(counts)
    ]
