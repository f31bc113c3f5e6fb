"""The three generation modes as step functions over a batch (DESIGN §1).

Each live request is a `Sequence`; its mode is a small strategy object with two methods:
`plan(seq)` says which tokens the next engine pass runs for that row (and whether causally) and which of them it
predicts from, and `update(seq, picks)` reads the tokens chosen at those positions (`dlm.candidates`: from the
engine's K candidates, never full-vocabulary logits), commits tokens, and returns how many of the pass's new
key/value columns the row keeps in its KV cache. `step` runs one engine pass over any mix of sequences and modes,
so the same loop serves `generate` here and the continuous-batching scheduler in Triton.

Every pass a row takes part in counts as one forward for it; the prompt's prefill is the first (a prompt longer
than the pass planner's chunk is prefilled in several causal passes, `dlm.planner`, each a forward). Block layout: the
causal pass (the prefill, or the pass that writes a finished block into the cache) predicts the block's first token,
the seed; the remaining `block_length - 1` positions start masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from dlm import penalties
from dlm.candidates import Picks, Score, pick
from dlm.planner import PassLimits, group_rows
from dlm.runtime import Runtime

MODES = ("ar", "diffusion", "speculative")
EXCLUDED = -1.0e30  # the logit the graph gives a token its allowed-token mask excludes (export/model.py)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class TokenSpec:
    """The ids decoding needs, read from the checkpoint's config.json."""

    mask_token_id: int
    eos_token_ids: frozenset[int]
    block_size: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config: dict[str, Any], eos_token_ids: frozenset[int] | None = None) -> "TokenSpec":
        """From config.json's content; `eos_token_ids` (all the checkpoint names, `dlm.special_tokens`) replaces
        config.json's own `eos_token_id`."""
        eos = config["eos_token_id"]
        return cls(
            mask_token_id=int(config["mask_token_id"]),
            eos_token_ids=eos_token_ids or frozenset(int(e) for e in (eos if isinstance(eos, list) else [eos])),
            block_size=int(config["block_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
        )


@dataclass(frozen=True)
class GenerationParams:
    mode: str = "diffusion"
    max_tokens: int = 64
    block_length: int | None = None  # None: the checkpoint's block_size
    threshold: float | None = 0.9  # None: commit an even share of the block in `steps` passes
    steps: int = 8
    temperature: float = 0.0
    seed: int | None = None  # None: a fresh random seed for this request
    top_k: int | None = None  # None: all K candidates of the engine
    top_p: float | None = None  # None: 1.0
    logprobs: int | None = None  # None: none recorded; n >= 0: the chosen token's log prob and n alternatives
    min_tokens: int = 0  # no end token is chosen before this many tokens, in every mode
    ignore_eos: bool = False  # no end token is ever chosen: decode to max_tokens
    # diffusion with a threshold: at most this many denoising passes per block; the last commits what is left
    max_block_passes: int | None = None
    # diffusion: a committed token is scored again in the next pass, its own position masked there; one whose
    # confidence then falls below this is masked again and re-predicted (self-correction)
    remask_threshold: float | None = None
    max_remasks: int | None = None  # re-maskings allowed per block (None: the block length)
    # speculative: draft with the engine's draft-only LoRA, when it has one (False: the base weights draft)
    draft_adapter: bool = True
    # on the engine's K candidates, in every mode (`dlm.penalties`): OpenAI's two and vLLM's repetition_penalty
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # a compiled grammar (`dlm.grammar.Grammar`): every chosen token is one it allows, in every mode
    guide: Any = None

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    @property
    def eos_allowed_from(self) -> int:
        """The first token index at which an end token may be chosen."""
        return self.max_tokens + 1 if self.ignore_eos else self.min_tokens

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range."""
        if self.mode not in MODES:
            raise ValueError(f"mode '{self.mode}' is unknown: expected one of {', '.join(MODES)}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.block_length is not None and self.block_length < 2:
            raise ValueError(f"block_length must be at least 2, got {self.block_length}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be at least 0, got {self.min_tokens}")
        if self.max_block_passes is not None and self.max_block_passes < 1:
            raise ValueError(f"max_block_passes must be at least 1, got {self.max_block_passes}")
        if self.remask_threshold is not None and not 0.0 < self.remask_threshold < 1.0:
            raise ValueError(f"remask_threshold must be in (0, 1), got {self.remask_threshold}")
        if self.max_remasks is not None and self.max_remasks < 0:
            raise ValueError(f"max_remasks must be at least 0, got {self.max_remasks}")
        penalties.check(self.frequency_penalty, self.presence_penalty, self.repetition_penalty)
        if self.guide is not None and self.remask_threshold is not None:
            raise ValueError("remask_threshold cannot be combined with guided decoding: a constrained block is "
                             "committed left to right and never re-masked")
        if self.guide is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with guided decoding: the grammar decides where the "
                             "answer ends")


@dataclass
class Pass:
    """What one row runs in the next engine pass, which of its tokens it predicts from (indices into `tokens`; a
    causal pass's prediction at i is for position i + 1), and the index in the answer of the token each of those
    predictions is for (`targets`: where an end token is not allowed yet, none is chosen)."""

    tokens: np.ndarray
    positions: np.ndarray
    causal: bool
    predict: np.ndarray
    targets: np.ndarray
    # more rows of the same sequence in the same pass, reading the same cache: re-masking's verifying rows
    extra: list["Pass"] = field(default_factory=list)
    draft: bool = False  # a drafting pass of self-speculation: the draft-only LoRA applies, where there is one

    @property
    def rows(self) -> int:
        return 1 + len(self.extra)

    @property
    def real_tokens(self) -> int:
        """Tokens of all its rows, padding excluded."""
        return len(self.tokens) + sum(len(e.tokens) for e in self.extra)

    @property
    def width(self) -> int:
        """The most tokens any of its rows runs (the pass pads every row to it)."""
        return max([len(self.tokens), *(len(e.tokens) for e in self.extra)])


@dataclass
class Sequence:
    """One request's decoding state. `tokens` holds what is final (the end token included when one was hit)."""

    prompt: list[int]
    params: GenerationParams
    spec: TokenSpec
    slot: int = 0
    tokens: list[int] = field(default_factory=list)
    cache_length: int = 0
    forwards: int = 0
    done: bool = False
    finish_reason: str | None = None  # "eos" or "length"
    # the block being refined: its tokens (mask id where not committed) and first position
    block: np.ndarray | None = None
    block_start: int = 0
    block_steps: int = 0
    phase: str = "prefill"
    prefill_chunk: int | None = None  # prompt tokens per prefill pass (None: the whole prompt in one)
    verify_rows: int = 4  # re-masking: most verifying rows this sequence may add to a pass (the planner sets it)
    # aligned with `tokens` when `params.logprobs` is set: log prob of each token and its best alternatives
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    block_scores: list[Score | None] = field(default_factory=list)  # per block position, once committed
    block_remasks: int = 0  # re-maskings spent in this block
    # with re-masking: block positions committed and not yet verified, the confidence each position's token had
    # when it was committed, and the positions the pending denoising pass predicts
    tentative: np.ndarray | None = None
    committed_confidence: np.ndarray | None = None
    pending: np.ndarray | None = None
    # speculative: verifying passes run and the tokens they committed (accepted drafts plus the bonus token)
    verify_passes: int = 0
    verified_tokens: int = 0
    forced_tokens: int = 0  # guided diffusion: tokens the grammar forced, committed without a pass
    # speculative with a draft adapter: each verifying pass also drafts the next block (a look-ahead row), which
    # saves that block's drafting pass when the whole block is accepted and the bonus token is the one foreseen
    lookahead: bool = False
    lookahead_draft: np.ndarray | None = None
    limits: PassLimits | None = None  # the pass planner's limits (None: unbounded), so extra rows always fit
    # prefix caching: prompt tokens whose keys and values were already in the slot when the request took it (the
    # prefill starts after them); None: no lookup was made (prefix caching off)
    cached_tokens: int | None = None

    def __post_init__(self) -> None:
        self.params.validate()
        if not self.prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        self.rng = np.random.default_rng(self.params.seed)  # None: fresh entropy from the OS
        self.constraint = self.params.guide.start() if self.params.guide is not None else None
        self.strategy = STRATEGIES[self.params.mode]

    @property
    def scored(self) -> bool:
        return self.params.logprobs is not None

    def allowed_masks(self, plan: Pass) -> np.ndarray | None:
        """[m, W] int32 allowed-token words for the m predictions of `plan` (one of this sequence's main rows), or
        None when the request has no grammar. The prefill and `ar` predict the next token: the matcher's state
        after the committed tokens. A speculative drafting pass: that state at its first position, nothing after.
        A verifying pass: the state after the committed tokens and the drafts before each position, so its choice
        at each position is the best allowed token given the prefix, as `ar`'s (the draft is checked against the
        grammar: past the first draft token it refuses, nothing can be accepted)."""
        constraint = self.constraint
        if constraint is None:
            return None
        if self.params.mode == "diffusion" and self.block is not None and self.phase != "prefill":
            settled = int(np.argmax(self.block == self.spec.mask_token_id)) if (
                self.block == self.spec.mask_token_id).any() else len(self.block)
            constraint.advance(self.tokens + [int(t) for t in self.block[1:settled]])  # the committed frontier
        else:
            constraint.advance(self.tokens)
        m = len(plan.predict)
        if self.phase == "verify":
            assert self.block is not None
            return constraint.masks_along(self.block[1:], m)
        masks = np.full((m, constraint.words), -1, dtype=np.int32)
        masks[-1 if plan.causal else 0] = constraint.mask()  # a prefill chunk reads its last prediction
        return masks

    def history(self, plan: Pass) -> penalties.History:
        """What the predictions of `plan` (one of this sequence's rows) are conditioned on, for the penalties: the
        answer (with the open block's committed tokens), of which a causal prediction sees the tokens before its
        target and a bidirectional one every committed token."""
        if self.block is not None and self.phase not in ("prefill",):
            answer = np.concatenate([np.asarray(self.tokens[:-1], dtype=np.int64), plan.tokens])  # block[0]: the seed
        else:
            answer = np.asarray(self.tokens, dtype=np.int64)
        if plan.causal:
            visible = np.minimum(plan.targets, len(answer)).astype(np.int64)
        else:
            answer = answer[answer != self.spec.mask_token_id]
            visible = np.full(len(plan.predict), len(answer), dtype=np.int64)
        if not hasattr(self, "_prompt_ids"):
            self._prompt_ids = np.unique(np.asarray(self.prompt, dtype=np.int64))
        return penalties.History(answer, visible, self._prompt_ids)

    def score(self, picks: Picks, j: int) -> Score | None:
        """The score of the choice at `j` of `picks`, when this request records them."""
        return picks.score(j, self.params.logprobs or 0) if self.params.logprobs is not None else None

    @property
    def block_length(self) -> int:
        return self.params.block_length or self.spec.block_size

    @property
    def context_needed(self) -> int:
        """Cache positions this request can touch: prompt, answer, and one block of look-ahead."""
        return len(self.prompt) + self.params.max_tokens + self.block_length

    @property
    def resident(self) -> list[int]:
        """The tokens whose keys and values the slot holds: the cache's position i holds token i of the prompt
        followed by the committed answer, always written by a causal pass (a bidirectional pass commits nothing,
        speculative decoding only what it accepted); the last committed token is not in it yet."""
        return (self.prompt + self.tokens)[: self.cache_length]

    def reuse(self, cached: int) -> None:
        """Start the prefill after the first `cached` prompt tokens, which the slot's cache holds already."""
        assert self.phase == "prefill" and self.cache_length == 0 and 0 <= cached < len(self.prompt)
        self.cache_length = self.cached_tokens = cached

    @property
    def output(self) -> list[int]:
        """Generated tokens, cut before the first end token."""
        return self.tokens[:-1] if self.finish_reason == "eos" else list(self.tokens)

    def finish_with(self, new_tokens: Iterable[int], scores: Iterable[Score | None] = ()) -> bool:
        """Append committed tokens (with their scores, when recorded), stopping at the first end token or at
        `max_tokens`; True when finished."""
        scores = iter(scores)
        for token in new_tokens:
            self.tokens.append(int(token))
            score = next(scores, None)
            if score is not None:
                self.logprobs.append(score[0])
                self.top_logprobs.append(score[1])
            if token in self.spec.eos_token_ids:
                self.done, self.finish_reason = True, "eos"
                return True
            if len(self.tokens) >= self.params.max_tokens:
                self.done, self.finish_reason = True, "length"
                return True
        return False


def prefill_pass(seq: Sequence) -> Pass:
    """The next chunk of the prompt, after the `cache_length` tokens already in the cache (the prefix cache's,
    then the earlier chunks')."""
    start = seq.cache_length
    end = len(seq.prompt) if seq.prefill_chunk is None else min(len(seq.prompt), start + seq.prefill_chunk)
    last = np.array([end - start - 1], dtype=np.int64)
    first = np.array([len(seq.tokens)], dtype=np.int64)
    positions = np.arange(start, end, dtype=np.int64)
    return Pass(np.asarray(seq.prompt[start:end], dtype=np.int64), positions, True, last, first)


def prompt_left(seq: Sequence) -> int:
    """Prompt tokens not yet in the cache: the last prefill chunk's length, once only one chunk is left."""
    return len(seq.prompt) - seq.cache_length


def block_pass(seq: Sequence, causal: bool, predict: np.ndarray) -> Pass:
    """A pass over the open block. Block position j holds answer token `len(tokens) - 1 + j` (the seed, at 0, is
    in `tokens` already); a causal prediction at j is for the position after it."""
    assert seq.block is not None
    positions = seq.block_start + np.arange(len(seq.block), dtype=np.int64)
    targets = len(seq.tokens) - 1 + predict + (1 if causal else 0)
    return Pass(seq.block.copy(), positions, causal, predict, targets)


def start_block(seq: Sequence, seed: int, start: int) -> None:
    """Open the next block at position `start` (the first one not in the cache): the seed, then masks."""
    seq.block = np.full(seq.block_length, seq.spec.mask_token_id, dtype=np.int64)
    seq.block[0] = seed
    seq.block_start = start
    seq.block_steps = 0
    seq.block_remasks = 0
    seq.tentative = np.zeros(seq.block_length, dtype=bool)
    seq.committed_confidence = np.zeros(seq.block_length)
    seq.block_scores = [None] * seq.block_length


class AutoRegressive:
    """One causal pass per token."""

    @staticmethod
    def plan(seq: Sequence) -> Pass:
        if seq.phase == "prefill":
            return prefill_pass(seq)
        one, target = np.zeros(1, dtype=np.int64), np.array([len(seq.tokens)], dtype=np.int64)
        return Pass(np.asarray(seq.tokens[-1:], dtype=np.int64), np.array([seq.cache_length]), True, one, target)

    @staticmethod
    def update(seq: Sequence, picks: Picks) -> int:
        keep = prompt_left(seq) if seq.phase == "prefill" else 1
        seq.phase = "decode"
        seq.finish_with(picks.tokens[-1:], [seq.score(picks, 0)])
        return keep


class BlockDiffusion:
    """Bidirectional passes commit tokens of the block until none is masked; a causal pass then writes the block
    into the cache and yields the next seed. Committed tokens are never re-masked, except with self-correction
    (`remask_threshold`): each committed token is then verified once, in the next pass, by a row of its own that
    sees the whole block but its own position masked (the model is trained to predict masked positions only, so
    this is the confidence the model has in it given everything committed since); one whose probability has
    fallen below `remask_threshold` is masked again and re-predicted, within `max_remasks` per block (WINO's
    draft-and-verify, with leave-one-out rows in place of its custom attention mask)."""

    @staticmethod
    def plan(seq: Sequence) -> Pass:
        if seq.phase == "prefill":
            return prefill_pass(seq)
        assert seq.block is not None
        if seq.phase == "write":  # its last token predicts the next block's seed
            return block_pass(seq, True, np.array([len(seq.block) - 1], dtype=np.int64))
        assert seq.tentative is not None
        seq.pending = BlockDiffusion._open_positions(seq)
        # nothing left to predict but tokens to verify: the row predicts the seed, and its choice is not read
        denoise = block_pass(seq, False, seq.pending if len(seq.pending) else np.zeros(1, dtype=np.int64))
        for j in np.flatnonzero(seq.tentative)[: seq.verify_rows].tolist():
            row = block_pass(seq, False, np.array([j], dtype=np.int64))
            row.tokens[j] = seq.spec.mask_token_id  # everything visible but the token being verified
            denoise.extra.append(row)
        return denoise

    @staticmethod
    def verify(seq: Sequence, row: Pass, picks: Picks) -> None:
        """Read one verifying row: its token is confirmed, or masked again if its probability has fallen below
        `remask_threshold` (it was committed at or above it; one committed below it, as the one token a pass must
        commit however unsure, cannot fall and is kept, so nothing is revised back and forth). A token missing
        from the K candidates has at most the K-th candidate's probability, which stands in for it."""
        assert seq.block is not None and seq.tentative is not None and seq.committed_confidence is not None
        assert seq.params.remask_threshold is not None
        j = int(row.predict[0])
        token = seq.block[j]
        hit = picks.candidate_tokens[0] == token
        probs = np.exp(picks.candidate_log_probs[0])
        confidence = float(probs[hit].sum()) if hit.any() else float(probs[-1])
        threshold = seq.params.remask_threshold
        if confidence < threshold <= seq.committed_confidence[j] and BlockDiffusion._remask_budget(seq) > 0:
            seq.block[j] = seq.spec.mask_token_id
            seq.block_scores[j] = None
            seq.block_remasks += 1
        seq.tentative[j] = False

    @staticmethod
    def update(seq: Sequence, picks: Picks) -> int:
        if seq.phase in ("prefill", "write"):
            if seq.phase == "write":
                assert seq.block is not None
                keep = len(seq.block)
                # the seed was appended when the block opened
                seq.finish_with(seq.block[1:], seq.block_scores[1:])
            else:
                keep = prompt_left(seq)
            if not seq.done:
                BlockDiffusion._open(seq, int(picks.tokens[-1]), keep, seq.score(picks, len(picks.tokens) - 1))
            return keep
        BlockDiffusion._denoise(seq, picks)
        return 0

    @staticmethod
    def _open(seq: Sequence, seed: int, written: int, score: Score | None) -> None:
        start_block(seq, seed, seq.cache_length + written)
        seq.phase = "denoise"
        if seq.finish_with([seed], [score]):
            return
        BlockDiffusion._finish_if_settled(seq)

    @staticmethod
    def _open_positions(seq: Sequence) -> np.ndarray:
        """The masked positions of the block that may still be generated: what a denoising pass predicts."""
        assert seq.block is not None
        return np.flatnonzero(seq.block[: BlockDiffusion._limit(seq)] == seq.spec.mask_token_id)

    @staticmethod
    def _remask_budget(seq: Sequence) -> int:
        p = seq.params
        if p.remask_threshold is None:
            return 0
        return (seq.block_length if p.max_remasks is None else p.max_remasks) - seq.block_remasks

    @staticmethod
    def _last_pass(seq: Sequence) -> bool:
        p = seq.params
        return p.threshold is not None and p.max_block_passes is not None and seq.block_steps + 1 >= p.max_block_passes

    @staticmethod
    def _denoise_constrained(seq: Sequence, picks: Picks) -> None:
        """Under a grammar, a position is committed only where the grammar can judge it: the contiguous frontier
        from the first uncommitted position. The first is the pass's choice under the allowed-token mask (always
        committed); each next one the best of its candidates the grammar allows after the tokens before it, while
        its probability meets the threshold; then every token the grammar forces (it allows exactly one) is
        committed without a pass."""
        assert seq.block is not None and seq.pending is not None and seq.constraint is not None
        constraint, open_positions = seq.constraint, seq.pending
        limit = BlockDiffusion._limit(seq)
        threshold = seq.params.threshold if seq.params.threshold is not None else 1.1  # steps: one per pass
        j, position = 0, int(open_positions[0]) if len(open_positions) else limit
        while j < len(open_positions) and int(open_positions[j]) == position and position < limit:
            if j == 0:
                token, score = int(picks.tokens[0]), seq.score(picks, 0)
            else:
                mask = constraint.mask()
                choice = next((k for k, t in enumerate(picks.candidate_tokens[j].tolist())
                               if constraint.allows(mask, int(t)) and picks.candidate_log_probs[j, k] > EXCLUDED / 2
                               and math.exp(picks.candidate_log_probs[j, k]) >= threshold), None)
                if choice is None:
                    break
                token = int(picks.candidate_tokens[j, choice])
                score = (float(picks.candidate_log_probs[j, choice]),
                         list(zip(picks.candidate_tokens[j, : seq.params.logprobs or 0].tolist(),
                                  picks.candidate_log_probs[j, : seq.params.logprobs or 0].tolist()))) \
                    if seq.scored else None
            seq.block[position], seq.block_scores[position] = token, score
            constraint.consume(token)
            j, position = j + 1, position + 1
            if token in seq.spec.eos_token_ids:
                break
            forced = constraint.matcher.compute_ff_tokens() if not constraint.matcher.is_stopped() else []
            for t in forced:  # committed without a pass
                if position >= limit or seq.block[position] != seq.spec.mask_token_id:
                    break
                seq.block[position], seq.block_scores[position] = int(t), None
                constraint.consume(int(t))
                seq.forced_tokens += 1
                position += 1
                j = len(open_positions)  # the pass's predictions past a forced token are stale
        seq.block_steps += 1
        BlockDiffusion._finish_if_settled(seq)

    @staticmethod
    def _denoise(seq: Sequence, picks: Picks) -> None:
        assert seq.block is not None and seq.tentative is not None and seq.pending is not None
        open_positions = seq.pending  # what the pass predicted; a token masked again just now waits for the next
        if len(open_positions) != len(picks.tokens):  # nothing was open: the row predicted the seed, unread
            picks = picks.subset(np.arange(len(open_positions)))
        if seq.constraint is not None:
            BlockDiffusion._denoise_constrained(seq, picks)
            return
        tokens, confidence = picks.tokens, picks.confidence
        p = seq.params
        last = BlockDiffusion._last_pass(seq)
        if last:
            chosen = np.ones(len(open_positions), dtype=bool)  # the pass cap: commit whatever is left
        elif p.threshold is not None:
            chosen = confidence >= p.threshold
            if len(chosen):
                chosen[np.argmax(confidence)] = True
        else:
            share = math.ceil(len(open_positions) / max(p.steps - seq.block_steps, 1))
            chosen = np.zeros(len(open_positions), dtype=bool)
            chosen[np.argsort(-confidence, kind="stable")[:share]] = True
        seq.block[open_positions[chosen]] = tokens[chosen]
        # with re-masking budget left, what this pass committed is verified by the next one (never on the last)
        seq.tentative[open_positions[chosen]] = (BlockDiffusion._remask_budget(seq) > 0 and not last
                                                 and seq.verify_rows > 0)
        assert seq.committed_confidence is not None
        seq.committed_confidence[open_positions[chosen]] = confidence[chosen]
        if seq.scored:
            for j in np.flatnonzero(chosen).tolist():
                seq.block_scores[int(open_positions[j])] = seq.score(picks, j)
        seq.block_steps += 1
        BlockDiffusion._finish_if_settled(seq)

    @staticmethod
    def _limit(seq: Sequence) -> int:
        """Positions of the block that may still be generated under `max_tokens` (the seed is in `tokens`)."""
        return min(seq.block_length, seq.params.max_tokens - len(seq.tokens) + 1)

    @staticmethod
    def _finish_if_settled(seq: Sequence) -> None:
        """Finish at an end token with everything before it committed; write the block once it is complete."""
        assert seq.block is not None
        assert seq.tentative is not None
        limit = BlockDiffusion._limit(seq)
        open_ = (seq.block[:limit] == seq.spec.mask_token_id) | seq.tentative[:limit]  # tentative: not settled yet
        first_open = int(np.argmax(open_)) if open_.any() else limit
        settled = seq.block[1:first_open]
        reaches_max_tokens = limit == seq.params.max_tokens - len(seq.tokens) + 1
        if any(int(t) in seq.spec.eos_token_ids for t in settled) or (first_open == limit and reaches_max_tokens):
            seq.finish_with(settled, seq.block_scores[1:first_open])  # stops at the end token or at max_tokens
        elif first_open == limit:
            seq.phase = "write"


class SelfSpeculative:
    """One bidirectional pass drafts the block, one causal pass verifies it: the longest agreeing prefix plus one
    bonus token are accepted. At temperature 0 the output equals `ar` token for token; above it each committed
    token is a sample of the causal model given the committed prefix, so it stays exact in distribution."""

    @staticmethod
    def plan(seq: Sequence) -> Pass:
        if seq.phase == "prefill":
            return prefill_pass(seq)
        assert seq.block is not None
        if seq.phase == "verify":  # every position: prediction i checks draft i + 1, the last gives the bonus
            verifying = block_pass(seq, True, np.arange(len(seq.block), dtype=np.int64))
            if SelfSpeculative._look_ahead_fits(seq):
                verifying.extra.append(SelfSpeculative._look_ahead_pass(seq))
            return verifying
        drafting = block_pass(seq, False, np.arange(1, len(seq.block), dtype=np.int64))
        drafting.draft = seq.params.draft_adapter
        return drafting

    @staticmethod
    def update(seq: Sequence, picks: Picks) -> int:
        if seq.phase == "prefill":
            keep = prompt_left(seq)
            SelfSpeculative._open(seq, int(picks.tokens[-1]), keep, seq.score(picks, 0))
            return keep
        assert seq.block is not None
        if seq.phase == "draft":
            seq.block[1:] = picks.greedy  # the draft is the bidirectional pass's best guess
            seq.phase = "verify"
            return 0
        predicted = picks.tokens  # predicted[i] is the causal model's token for position i + 1
        drafts = seq.block[1:]
        agree = drafts == predicted[: len(drafts)]
        accepted = int(np.argmin(agree)) if not agree.all() else len(drafts)
        keep = 1 + accepted  # the seed and the accepted drafts are now in the cache
        bonus = int(predicted[accepted])
        scores = [seq.score(picks, j) for j in range(accepted)] if seq.scored else []
        before = len(seq.tokens)
        foreseen, seq.lookahead_draft = seq.lookahead_draft, None
        if not seq.finish_with(drafts[:accepted], scores):
            SelfSpeculative._open(seq, bonus, keep, seq.score(picks, accepted))
            if (foreseen is not None and accepted == len(drafts) and not seq.done and int(foreseen[0]) == bonus
                    and len(seq.block) > 1):
                seq.block[1:] = foreseen[1 : len(seq.block)]  # the look-ahead row drafted this block already
                seq.phase = "verify"
        seq.verify_passes += 1
        seq.verified_tokens += len(seq.tokens) - before
        return keep

    @staticmethod
    def _look_ahead_pass(seq: Sequence) -> Pass:
        """The block being verified (seed and drafts) then a block of masks, one bidirectional drafting row: its
        predictions at the masks draft the next block, its first one the bonus token it expects."""
        assert seq.block is not None
        n = len(seq.block)
        tokens = np.concatenate([seq.block, np.full(n, seq.spec.mask_token_id, dtype=np.int64)])
        positions = seq.block_start + np.arange(2 * n, dtype=np.int64)
        predict = np.arange(n, 2 * n, dtype=np.int64)
        return Pass(tokens, positions, False, predict, len(seq.tokens) - 1 + predict, draft=True)

    @staticmethod
    def _look_ahead_fits(seq: Sequence) -> bool:
        """Worth it (a next block can follow) and within the pass limits: two rows of twice the block."""
        if not seq.lookahead or seq.block is None:
            return False
        n = len(seq.block)
        if len(seq.tokens) - 1 + n >= seq.params.max_tokens:  # this block reaches max_tokens: nothing follows
            return False
        limits = seq.limits
        return limits is None or (limits.max_batch >= 2 and 2 * n <= limits.max_tokens and 4 * n <= limits.token_budget
                                  and n <= limits.max_block and seq.block_start + 2 * n <= limits.max_context)

    @staticmethod
    def look_ahead(seq: Sequence, picks: Picks) -> None:
        """Keep the look-ahead row's draft of the next block for the verifying row's update."""
        seq.lookahead_draft = np.array(picks.greedy)

    @staticmethod
    def _open(seq: Sequence, seed: int, written: int, score: Score | None) -> None:
        start_block(seq, seed, seq.cache_length + written)
        seq.phase = "draft"
        seq.finish_with([seed], [score])


class Strategy(Protocol):
    """What `step` asks of a mode (the classes above, whose methods are static, are used as they are)."""

    def plan(self, seq: Sequence) -> Pass: ...

    def update(self, seq: Sequence, picks: Picks) -> int: ...


STRATEGIES: dict[str, Strategy] = {"ar": AutoRegressive, "diffusion": BlockDiffusion, "speculative": SelfSpeculative}


def step(runtime: Runtime, seqs: list[Sequence], pad_token_id: int = 0, plans: list[Pass] | None = None) -> None:
    """One engine pass over every sequence in `seqs` (any mix of modes); commits their tokens and KV columns.
    `plans` are the rows' plans when the caller has made them already (the pass planner has). A plan's `extra`
    rows (re-masking's verifying rows) run in the same pass, read the same cache slot and keep no columns."""
    plans = plans if plans is not None else [seq.strategy.plan(seq) for seq in seqs]
    rows = list(zip(seqs, plans))  # the main row of every sequence, then the verifying rows
    rows += [(seq, extra) for seq, plan in zip(seqs, plans) for extra in plan.extra]
    b, t = len(rows), max(len(p.tokens) for _, p in rows)
    n = max(len(p.predict) for _, p in rows)
    input_ids = np.full((b, t), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((b, t), dtype=np.int64)
    new_mask = np.zeros((b, t), dtype=np.int64)
    logit_positions = np.empty((b, n), dtype=np.int64)
    no_eos = np.zeros((b, n), dtype=bool)  # predictions for answer tokens at which no end token may be chosen
    for i, (seq, p) in enumerate(rows):
        k, m = len(p.tokens), len(p.predict)
        input_ids[i, :k], position_ids[i, :k], new_mask[i, :k] = p.tokens, p.positions, 1
        logit_positions[i, :m], logit_positions[i, m:] = p.predict, p.predict[-1]  # padding repeats a real one
        no_eos[i, :m] = p.targets < seq.params.eos_allowed_from
    slots = np.array([seq.slot for seq, _ in rows], dtype=np.int64)
    starts = np.array([seq.cache_length for seq, _ in rows], dtype=np.int64)
    causal = np.array([p.causal for _, p in rows])
    draft = np.array([p.draft for _, p in rows])
    allowed = [(i, seq.allowed_masks(p)) for i, (seq, p) in enumerate(rows[: len(seqs)])]
    constrained = [(i, masks) for i, masks in allowed if masks is not None]
    bitmask = None
    if constrained:
        words = constrained[0][1].shape[1]
        stacked = np.full((len(constrained), n, words), -1, dtype=np.int32)
        for j, (_, masks) in enumerate(constrained):
            stacked[j, : len(masks)] = masks
        bitmask = (np.array([i for i, _ in constrained], dtype=np.int64), stacked)
    candidates = runtime.forward(slots, input_ids, position_ids, new_mask, starts, causal, logit_positions, draft,
                                 bitmask)
    eos_ids = np.fromiter(seqs[0].spec.eos_token_ids, dtype=np.int64)
    scores = None
    for i, (seq, p) in enumerate(rows):
        q = seq.params
        if q.penalised:
            scores = candidates.logits.copy() if scores is None else scores
            m = len(p.predict)
            scores[i, :m] = penalties.apply(candidates.logits[i, :m], candidates.tokens[i, :m], seq.history(p),
                                            q.frequency_penalty, q.presence_penalty, q.repetition_penalty)
    if constrained:  # candidates the mask excluded (fewer than K allowed) are never chosen
        scores = candidates.logits.copy() if scores is None else scores
        for i, _ in constrained:
            scores[i] = np.where(candidates.logits[i] <= EXCLUDED / 2, -np.inf, scores[i])
    picks = pick(candidates, [seq for seq, _ in rows], [len(p.predict) for _, p in rows],
                 no_eos if no_eos.any() else None, eos_ids, scores)
    counts = np.zeros(b, dtype=np.int64)
    for i, (seq, plan) in enumerate(rows[len(seqs):], start=len(seqs)):  # before the main rows:
        if plan.draft:
            SelfSpeculative.look_ahead(seq, picks[i])  # the next block's draft, for the verifying row
        else:
            BlockDiffusion.verify(seq, plan, picks[i])  # a token masked again is not committed
    for i, (seq, plan) in enumerate(rows[: len(seqs)]):
        seq.forwards += 1
        if seq.phase == "prefill" and len(plan.tokens) < prompt_left(seq):
            counts[i] = len(plan.tokens)  # a prefill chunk before the last: into the cache, nothing to choose
        else:
            counts[i] = seq.strategy.update(seq, picks[i])
        seq.cache_length += int(counts[i])
    runtime.commit(slots, starts, counts)


def plan_step(seqs: list[Sequence], limits: PassLimits | None) -> list[tuple[list[Sequence], list[Pass]]]:
    """The passes of one step over `seqs`: every row's plan, grouped by the pass planner into passes that fit
    `limits` (None: one pass for all, as a plain module without a profile runs)."""
    if limits is not None:
        for seq in seqs:
            seq.limits = limits
            seq.prefill_chunk = limits.chunk
            seq.verify_rows = max(0, min(seq.verify_rows, limits.max_batch - 1,
                                         limits.token_budget // seq.block_length - 1))
    plans = [seq.strategy.plan(seq) for seq in seqs]
    if limits is None:
        return [(seqs, plans)]
    # a chunk of a prompt that goes on after it passes alone; a prompt's last (or only) chunk joins the rest
    continuing = [int(s.phase == "prefill" and len(p.tokens) < prompt_left(s)) for s, p in zip(seqs, plans)]
    groups = group_rows([(p.width, s.cache_length, p.rows, kind, p.real_tokens)
                         for s, p, kind in zip(seqs, plans, continuing)], limits)
    return [([seqs[i] for i in group], [plans[i] for i in group]) for group in groups]


def look_ahead_for(params: GenerationParams, runtime: Runtime) -> bool:
    """Speculative requests look ahead (a drafting row in each verifying pass) where the engine has a draft
    adapter and the request uses it: the adapter is trained for that row; the base weights' drafts are not."""
    return params.mode == "speculative" and params.draft_adapter and bool(getattr(runtime, "has_draft_adapter", False))


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, cut before the first end token
    num_tokens: int  # committed tokens up to and including the first end token
    num_forwards: int  # engine passes this request took part in, the prefill included
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)  # per generated token, when asked for
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    verify_passes: int = 0  # speculative: verifying passes, and the tokens they committed
    verified_tokens: int = 0


def generate(
    runtime: Runtime,
    prompts: list[list[int]],
    params: GenerationParams | list[GenerationParams],
    spec: TokenSpec,
    limits: PassLimits | None = None,
) -> list[Generation]:
    """Decode a batch to the end, the rows sharing passes as the pass planner groups them (by default from the
    runtime's artifact profile, if it has one); rows that finish stop changing."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [Sequence(list(p), q, spec, slot=i) for i, (p, q) in enumerate(zip(prompts, params_list))]
    for seq in seqs:
        seq.lookahead = look_ahead_for(seq.params, runtime)
    context = max(s.context_needed for s in seqs)
    if context > spec.max_position_embeddings:
        raise ValueError(
            f"prompt + max_tokens + block_length = {context} positions exceeds the model's "
            f"max_position_embeddings ({spec.max_position_embeddings})"
        )
    if runtime.slots < len(seqs) or runtime.context < context:
        runtime.allocate(max(len(seqs), runtime.slots), max(context, runtime.context))
    profile = getattr(runtime, "profile", None)
    limits = limits or (PassLimits.from_profile(profile) if profile is not None else None)
    live = list(seqs)
    while live:
        for group, plans in plan_step(live, limits):
            step(runtime, group, plans=plans)
        live = [s for s in live if not s.done]
    return [
        Generation(s.output, len(s.tokens), s.forwards, s.finish_reason or "length", s.logprobs[: len(s.output)],
                   s.top_logprobs[: len(s.output)], s.verify_passes, s.verified_tokens)
        for s in seqs
    ]
