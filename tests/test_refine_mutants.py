"""`dlm.refine` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded, or that
it would: each parameter's accepted extremes and its refusal word for word, the ids read from config.json, and when
an end token is allowed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from dlm.candidates import Candidates, Picks
from dlm.grammar import Constraint
from dlm.planner import PassLimits
from dlm.contract import Profile
from dlm.refine import (AutoRegressive, BlockDiffusion, GenerationParams, Pass, SelfSpeculative, Sequence, TokenSpec,
                         generate, look_ahead_for, plan_step, start_block)
from dlm.runtime import CacheLayout, TorchRuntime

EDGES: list[dict[str, Any]] = [
    {"max_tokens": 1}, {"block_length": 2}, {"threshold": 1.0}, {"threshold": 1e-9}, {"steps": 1},
    {"temperature": 0.0}, {"top_k": 1}, {"top_p": 1.0}, {"top_p": 1e-9}, {"logprobs": 0}, {"logprobs": 20},
    {"min_tokens": 0}, {"max_block_passes": 1}, {"remask_threshold": 1e-9}, {"remask_threshold": 1 - 1e-9},
    {"max_remasks": 0}, {"mode": "ar"}, {"mode": "speculative"},
]


@pytest.mark.parametrize("fields", EDGES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_each_parameter_accepts_its_extremes(fields: dict[str, Any]) -> None:
    GenerationParams(**fields).validate()


@pytest.mark.parametrize("fields, message", [
    ({"mode": "fast"}, "mode 'fast' is unknown: expected one of ar, diffusion, speculative"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"block_length": 1}, "block_length must be at least 2, got 1"),
    ({"threshold": 0.0}, "threshold must be in (0, 1], got 0.0"),
    ({"threshold": 1.5}, "threshold must be in (0, 1], got 1.5"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    ({"top_k": 0}, "top_k must be at least 1, got 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
    ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
    ({"min_tokens": -1}, "min_tokens must be at least 0, got -1"),
    ({"max_block_passes": 0}, "max_block_passes must be at least 1, got 0"),
    ({"remask_threshold": 0.0}, "remask_threshold must be in (0, 1), got 0.0"),
    ({"remask_threshold": 1.0}, "remask_threshold must be in (0, 1), got 1.0"),
    ({"max_remasks": -1}, "max_remasks must be at least 0, got -1"),
])
def test_each_refusal_names_the_field_its_range_and_the_value(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        GenerationParams(**fields).validate()
    assert str(raised.value) == message


def test_the_end_token_is_allowed_from_min_tokens_or_never_with_ignore_eos() -> None:
    assert GenerationParams(max_tokens=10).eos_allowed_from == 0
    assert GenerationParams(max_tokens=10, min_tokens=4).eos_allowed_from == 4
    assert GenerationParams(max_tokens=10, min_tokens=4, ignore_eos=True).eos_allowed_from == 11


def test_token_ids_from_config_json() -> None:
    config = {"mask_token_id": "100", "eos_token_id": 2, "block_size": "32", "max_position_embeddings": 4096}
    spec = TokenSpec.from_config(config)
    assert spec == TokenSpec(mask_token_id=100, eos_token_ids=frozenset({2}), block_size=32,
                             max_position_embeddings=4096)
    assert TokenSpec.from_config({**config, "eos_token_id": [2, "11"]}).eos_token_ids == frozenset({2, 11})
    # the checkpoint's end tokens, all of them (dlm.special_tokens), replace config.json's own
    assert TokenSpec.from_config(config, frozenset({2, 7})).eos_token_ids == frozenset({2, 7})
    assert dataclasses.replace(spec).block_size == 32


# --- re-masking's verifying rows (BlockDiffusion.verify), on a hand-made block ------------------------------------
SPEC = TokenSpec(mask_token_id=0, eos_token_ids=frozenset({1}), block_size=4, max_position_embeddings=4096)
MASK = SPEC.mask_token_id


def block_being_verified(committed_confidence: float, max_remasks: int | None = None, remasks: int = 0) -> Sequence:
    """A diffusion sequence whose open block holds token 7 at position 2, committed with `committed_confidence`
    and waiting for its verifying row (re-masking below 0.5)."""
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, remask_threshold=0.5, max_remasks=max_remasks,
                                            logprobs=1), SPEC)
    start_block(seq, 9, 2)
    assert seq.block is not None and seq.tentative is not None and seq.committed_confidence is not None
    seq.block[2], seq.tentative[2], seq.committed_confidence[2] = 7, True, committed_confidence
    seq.block_scores[2] = (math.log(committed_confidence), [])
    seq.block_remasks = remasks
    return seq


def verifying_picks(tokens: list[int], probs: list[float]) -> Picks:
    """What the verifying row (one prediction, at the token's own masked position) returned."""
    log_probs = np.log(np.array([probs]))
    return Picks(np.array([tokens[0]]), log_probs[:, 0], np.array([tokens[0]]), np.array([tokens]), log_probs)


def verify(seq: Sequence, tokens: list[int], probs: list[float]) -> bool:
    """Run the verifying row; True when the token was masked again."""
    row = Pass(np.array([9, 0, 0, 0]), np.arange(2, 6), False, np.array([2]), np.array([3]))
    BlockDiffusion.verify(seq, row, verifying_picks(tokens, probs))
    assert seq.block is not None and seq.tentative is not None
    assert not seq.tentative[2]  # verified once, whatever the outcome
    remasked = int(seq.block[2]) == MASK
    assert (seq.block_scores[2] is None) == remasked
    return remasked


def test_a_token_whose_probability_fell_below_the_threshold_is_masked_again() -> None:
    seq = block_being_verified(0.9)
    assert verify(seq, [3, 7, 4], [0.6, 0.3, 0.1])  # its own probability now: 0.3
    assert seq.block_remasks == 1


def test_a_token_still_above_the_threshold_is_kept() -> None:
    seq = block_being_verified(0.9)
    assert not verify(seq, [3, 7, 4], [0.2, 0.7, 0.1])
    assert seq.block_remasks == 0
    assert not verify(block_being_verified(0.9), [7, 3], [0.5, 0.5])  # exactly at the threshold: kept


def test_a_token_missing_from_the_candidates_has_at_most_the_last_ones_probability() -> None:
    assert verify(block_being_verified(0.9), [3, 4, 5], [0.5, 0.3, 0.2])  # 7 not among them: at most 0.2
    assert not verify(block_being_verified(0.9), [3, 4, 5], [0.2, 0.2, 0.55])  # at most 0.55, not the first


def test_only_a_token_committed_at_or_above_the_threshold_can_fall() -> None:
    assert not verify(block_being_verified(0.4), [3, 7], [0.9, 0.1])  # committed below it: kept, not revised
    assert verify(block_being_verified(0.5), [3, 7], [0.9, 0.1])  # committed exactly at it: it can fall


def test_re_masking_stops_when_the_blocks_budget_is_spent() -> None:
    assert not verify(block_being_verified(0.9, max_remasks=0), [3, 7], [0.9, 0.1])
    seq = block_being_verified(0.9, max_remasks=2, remasks=1)  # one left
    assert verify(seq, [3, 7], [0.9, 0.1]) and seq.block_remasks == 2
    seq = block_being_verified(0.9, remasks=3)  # no max_remasks: the block length (4), one left
    assert verify(seq, [3, 7], [0.9, 0.1]) and seq.block_remasks == 4


# --- what penalties see (Sequence.history) ------------------------------------------------------------------------
def test_a_bidirectional_row_sees_every_committed_answer_token_and_no_mask() -> None:
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, presence_penalty=1.0), SPEC)
    seq.tokens = [8, 9]  # the answer so far; 9 seeds the open block
    start_block(seq, 9, 3)
    seq.phase = "denoise"
    assert seq.block is not None
    seq.block[2] = 4  # committed in an earlier pass; positions 1 and 3 still masked
    plan = BlockDiffusion.plan(seq)
    history = seq.history(plan)
    assert history.answer.tolist() == [8, 9, 4] and history.visible.tolist() == [3, 3]
    assert history.prompt.tolist() == [5, 6]


# --- constrained diffusion's frontier (BlockDiffusion._denoise_constrained), under a scripted grammar --------------
class ScriptedMatcher:
    """llguidance's matcher over a fixed script: at each step the set of tokens allowed, or one forced token (an
    int: `compute_ff_tokens` returns the run of them from the current step). Stopped at the script's end."""

    def __init__(self, script: list[Any]) -> None:
        self.script, self.at = script, 0

    def is_stopped(self) -> bool:
        return self.at >= len(self.script)

    def compute_ff_tokens(self) -> list[int]:
        run = []
        for step in self.script[self.at:]:
            if not isinstance(step, int):
                break
            run.append(step)
        return run

    def allowed(self) -> set[int]:
        if self.is_stopped():
            return {1}  # only the end token
        step = self.script[self.at]
        return {step} if isinstance(step, int) else set(step)

    def consume_token(self, token: int) -> None:
        assert token in self.allowed(), f"the grammar refuses {token} at step {self.at}"
        self.at += 1


class ScriptedConstraint:
    """`dlm.grammar.Constraint`'s interface over a ScriptedMatcher (`words` mask words: token ids below 32 × words)."""

    allows = staticmethod(Constraint.allows)

    def __init__(self, script: list[Any], words: int = 1) -> None:
        self.matcher = ScriptedMatcher(script)
        self.words = words
        self.consumed = 0
        self.tokens: list[int] = []

    def mask(self) -> np.ndarray:
        bits = sum(1 << t for t in self.matcher.allowed())
        return np.array([(bits >> (32 * w)) & 0xFFFFFFFF for w in range(self.words)], dtype=np.uint32).view(np.int32)

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))
        self.consumed += 1
        self.tokens.append(int(token))

    def advance(self, tokens: list[int]) -> None:
        for token in tokens[self.consumed:]:
            self.consume(token)


@dataclasses.dataclass(frozen=True)
class ScriptedGuide:
    script: tuple[Any, ...]
    words: int = 1

    def start(self) -> ScriptedConstraint:
        return ScriptedConstraint(list(self.script), self.words)


GUIDED = TokenSpec(mask_token_id=0, eos_token_ids=frozenset({1}), block_size=8, max_position_embeddings=4096)


def guided_block(script: list[Any], **params: Any) -> Sequence:
    """A guided diffusion sequence whose prefill chose the seed 9 (the script's first step): its first block open
    at positions 2..9, every position but the seed masked."""
    seq = Sequence([5, 6], GenerationParams("diffusion", **{"max_tokens": 32, **params},
                                            guide=ScriptedGuide(tuple(script))), GUIDED)
    seq.tokens = [9]
    start_block(seq, 9, 2)
    seq.phase = "denoise"
    return seq


def denoise(seq: Sequence, first: int, rows: list[tuple[list[int], list[float]]]) -> None:
    """One denoising pass as `step` runs it: the plan, the grammar advanced along the committed frontier (the mask
    of the first open position), then the pass's picks: `first` chosen under that mask at the first open position,
    and each position's candidates with their probabilities (position j's row is rows[j])."""
    plan = BlockDiffusion.plan(seq)
    seq.allowed_masks(plan)
    assert seq.pending is not None and len(seq.pending) == len(plan.predict)
    n, k = len(seq.pending), max(len(t) for t, _ in rows)
    tokens = np.full((n, k), 2, dtype=np.int64)
    log_probs = np.full((n, k), math.log(1e-6))
    for j, (candidates, probs) in enumerate(rows[:n]):
        tokens[j, : len(candidates)], log_probs[j, : len(probs)] = candidates, np.log(probs)
    chosen = np.array([first] + [int(t) for t in tokens[1:, 0]])
    chosen_log_probs = np.array([log_probs[0][list(tokens[0]).index(first)]] + list(log_probs[1:, 0]))
    assert BlockDiffusion.update(seq, Picks(chosen, chosen_log_probs, tokens[:, 0], tokens, log_probs)) == 0


def block_of(seq: Sequence) -> list[int]:
    assert seq.block is not None
    return seq.block.tolist()


M = GUIDED.mask_token_id
ANY: tuple[list[int], list[float]] = ([2], [0.99])  # a position the frontier does not reach


def test_the_tokens_the_grammar_forces_are_committed_without_a_pass() -> None:
    seq = guided_block([9, {3, 4}, 5, 6, {7, 8}], threshold=0.9, logprobs=1)
    denoise(seq, 3, [([3, 4, 2], [0.6, 0.3, 0.1])] + [ANY] * 6)
    assert block_of(seq) == [9, 3, 5, 6, M, M, M, M]
    assert seq.forced_tokens == 2 and seq.block_steps == 1 and seq.phase == "denoise" and not seq.done
    assert seq.block_scores[1] == (pytest.approx(math.log(0.6)), [(3, pytest.approx(math.log(0.6)))])
    assert seq.block_scores[2] is None and seq.block_scores[3] is None  # forced: no prediction behind them
    assert isinstance(seq.constraint, ScriptedConstraint) and seq.constraint.tokens == [9, 3, 5, 6]


def test_the_frontier_goes_on_while_an_allowed_candidate_meets_the_threshold() -> None:
    seq = guided_block([9, {3, 4}, {3, 4}, {7, 8}, {3, 4}, {7, 8}], threshold=0.9, logprobs=2)
    denoise(seq, 3, [([3], [0.5]),
                     ([4, 3, 2], [0.95, 0.04, 0.01]),  # allowed and confident: committed
                     ([2, 7, 8], [0.92, 0.05, 0.03]),  # 2 is confident but refused; 7 allowed but unsure: stop
                     ([3], [0.99])] + [ANY] * 3)
    assert block_of(seq) == [9, 3, 4, M, M, M, M, M] and seq.forced_tokens == 0 and seq.block_steps == 1
    assert seq.block_scores[2] == (pytest.approx(math.log(0.95)),
                                   [(4, pytest.approx(math.log(0.95))), (3, pytest.approx(math.log(0.04)))])
    # the next pass starts where this one stopped
    denoise(seq, 7, [([7], [0.4]), ([3], [0.5])] + [ANY] * 3)
    assert block_of(seq) == [9, 3, 4, 7, M, M, M, M] and seq.block_steps == 2


def test_a_candidate_exactly_at_the_threshold_is_committed() -> None:
    seq = guided_block([9, {3, 4}, {3, 4}, {7, 8}], threshold=0.5)
    denoise(seq, 3, [([3], [0.5]), ([4], [0.5]), ([2], [0.9])] + [ANY] * 4)
    assert block_of(seq)[:4] == [9, 3, 4, M] and seq.block_scores[2] is None  # not asked for log probs


def test_with_fixed_steps_one_position_is_committed_per_pass() -> None:
    seq = guided_block([9, {3, 4}, {3, 4}, {7, 8}], threshold=None, steps=8)
    denoise(seq, 4, [([4], [0.9]), ([3], [0.999]), ([7], [0.999])] + [ANY] * 4)
    assert block_of(seq)[:3] == [9, 4, M] and seq.block_steps == 1


def test_an_end_token_ends_the_frontier_and_the_answer() -> None:
    seq = guided_block([9, {3, 1}, {3, 4}], threshold=0.9)
    denoise(seq, 1, [([1, 3], [0.8, 0.2]), ([3], [0.99])] + [ANY] * 5)
    assert seq.done and seq.finish_reason == "eos" and seq.tokens == [9, 1] and seq.output == [9]
    assert block_of(seq)[:3] == [9, 1, M] and seq.block_steps == 1


def test_forced_tokens_stop_at_max_tokens() -> None:
    seq = guided_block([9, {3, 4}, 5, 6, 7], threshold=0.9, max_tokens=3)  # the seed and two more
    denoise(seq, 3, [([3], [0.7]), ([5], [0.9])])
    assert block_of(seq) == [9, 3, 5, M, M, M, M, M] and seq.forced_tokens == 1
    assert seq.done and seq.finish_reason == "length" and seq.tokens == [9, 3, 5] and seq.block_steps == 1


# --- self-speculation's look-ahead row, and prefix reuse ----------------------------------------------------------
def test_the_look_ahead_row_drafts_the_next_block_bidirectionally() -> None:
    seq = Sequence([5, 6], GenerationParams("speculative", 32), SPEC)  # blocks of 4
    seq.tokens = [9, 3]  # 9 committed earlier; 3 seeds the block being verified
    start_block(seq, 3, 7)
    assert seq.block is not None
    seq.block[1:] = [4, 5, 6]  # its drafts
    row = SelfSpeculative._look_ahead_pass(seq)
    assert row.tokens.tolist() == [3, 4, 5, 6, 0, 0, 0, 0] and row.positions.tolist() == list(range(7, 15))
    assert row.causal is False and row.draft is True and row.extra == []
    assert row.predict.tolist() == [4, 5, 6, 7]  # the masks: the next block's seed (the bonus token) and drafts
    assert row.targets.tolist() == [5, 6, 7, 8]  # answer indices: the block being verified holds 1..4
    assert all(a.dtype == np.int64 for a in (row.tokens, row.positions, row.predict, row.targets))


def test_a_prefix_is_reused_only_before_the_prefill_and_never_the_last_prompt_token() -> None:
    seq = Sequence([5, 6, 7], GenerationParams("ar", 4), SPEC)
    seq.reuse(2)
    assert (seq.cache_length, seq.cached_tokens) == (2, 2)
    with pytest.raises(AssertionError):
        seq.reuse(1)  # part of the prompt is in the cache already
    with pytest.raises(AssertionError):
        Sequence([5, 6, 7], GenerationParams("ar", 4), SPEC).reuse(3)  # the last token's prediction must run


def test_an_ar_decoding_pass_runs_the_last_token_causally_for_the_next() -> None:
    seq = Sequence([5, 6], GenerationParams("ar", 8), SPEC)
    seq.tokens, seq.cache_length, seq.phase = [7, 8, 3], 4, "decode"
    row = AutoRegressive.plan(seq)
    assert row.tokens.tolist() == [3] and row.positions.tolist() == [4] and row.causal is True
    assert row.predict.tolist() == [0] and row.targets.tolist() == [3] and row.extra == [] and row.draft is False


LOOK_AHEAD_LIMITS = PassLimits(max_batch=2, max_tokens=8, max_context=64, max_block=4, token_budget=16)


def look_ahead_fits(max_tokens: int = 32, committed: int = 2, block_start: int = 10,
                    limits: PassLimits | None = LOOK_AHEAD_LIMITS) -> bool:
    seq = Sequence([5, 6], GenerationParams("speculative", max_tokens), SPEC)  # blocks of 4
    seq.tokens, seq.lookahead, seq.limits = list(range(3, 3 + committed)), True, limits
    start_block(seq, seq.tokens[-1], block_start)
    return SelfSpeculative._look_ahead_fits(seq)


def test_the_look_ahead_row_runs_only_where_a_next_block_follows_and_fits() -> None:
    assert look_ahead_fits() and look_ahead_fits(limits=None)
    # the block being verified holds answer tokens 2..5 (the seed is the 2nd): a 6th token can follow it or not
    assert look_ahead_fits(max_tokens=6) and not look_ahead_fits(max_tokens=5)
    assert not look_ahead_fits(max_tokens=4)
    # each limit at its edge: two rows of twice the block (8 tokens each), 16 tokens in all, 4 predicted positions
    assert look_ahead_fits(block_start=56)  # 56 + 8 = the 64 positions of the context
    assert not look_ahead_fits(block_start=57)
    for changed in ({"max_batch": 1}, {"max_tokens": 7}, {"token_budget": 15}, {"max_block": 3}):
        limits = dataclasses.replace(LOOK_AHEAD_LIMITS, **changed)
        assert not look_ahead_fits(limits=limits), changed
    seq = Sequence([5, 6], GenerationParams("speculative", 32), SPEC)
    start_block(seq, 3, 10)
    assert not SelfSpeculative._look_ahead_fits(seq)  # a request without a draft adapter does not look ahead


@pytest.mark.parametrize("draft_adapter", [True, False])
def test_a_speculative_block_is_drafted_bidirectionally_and_verified_causally(draft_adapter: bool) -> None:
    seq = Sequence([5, 6], GenerationParams("speculative", 32, draft_adapter=draft_adapter), SPEC)  # blocks of 4
    seq.tokens, seq.cache_length = [9, 3], 7
    start_block(seq, 3, 7)
    seq.phase = "draft"
    drafting = SelfSpeculative.plan(seq)
    assert drafting.tokens.tolist() == [3, M, M, M] and drafting.positions.tolist() == [7, 8, 9, 10]
    assert drafting.causal is False and drafting.draft is draft_adapter  # a bool per row, as the runtime takes it
    assert drafting.predict.tolist() == [1, 2, 3] and drafting.targets.tolist() == [2, 3, 4]  # the masks
    assert seq.block is not None
    seq.block[1:] = [4, 5, 6]
    seq.phase = "verify"
    verifying = SelfSpeculative.plan(seq)
    assert verifying.tokens.tolist() == [3, 4, 5, 6] and verifying.causal is True and verifying.draft is False
    # prediction i checks draft i + 1; the last one is the bonus token
    assert verifying.predict.tolist() == [0, 1, 2, 3] and verifying.targets.tolist() == [2, 3, 4, 5]
    assert all(a.dtype == np.int64 for p in (drafting, verifying) for a in (p.tokens, p.positions, p.predict))


def verified(predicted: list[int], foreseen: list[int] | None) -> Sequence:
    """A speculative block [3, 4, 5, 6] (seed 3, drafts 4 5 6) verified by `predicted` (the causal token for each
    next position), the look-ahead row having drafted `foreseen` for the block after it."""
    seq = Sequence([5, 6], GenerationParams("speculative", 32), SPEC)  # blocks of 4
    seq.tokens, seq.cache_length = [9, 3], 7
    start_block(seq, 3, 7)
    assert seq.block is not None
    seq.block[1:] = [4, 5, 6]
    seq.phase = "verify"
    seq.lookahead_draft = None if foreseen is None else np.array(foreseen)
    tokens = np.array(predicted)
    log_probs = np.zeros(len(predicted))
    SelfSpeculative.update(seq, Picks(tokens, log_probs, tokens, tokens[:, None], log_probs[:, None]))
    return seq


def test_the_look_ahead_draft_is_used_only_when_the_whole_block_was_accepted_and_its_bonus_foreseen() -> None:
    # all three drafts accepted, bonus 8, foreseen by the look-ahead row: the next block is verified at once
    seq = verified([4, 5, 6, 8], foreseen=[8, 20, 21, 22])
    assert seq.tokens == [9, 3, 4, 5, 6, 8] and seq.phase == "verify"
    assert seq.block is not None and seq.block.tolist() == [8, 20, 21, 22]
    # a bonus the look-ahead did not foresee: drafted again
    seq = verified([4, 5, 6, 8], foreseen=[7, 20, 21, 22])
    assert seq.phase == "draft" and seq.block is not None and seq.block.tolist() == [8, M, M, M]
    # a draft refused (5 for 6): the look-ahead drafted past a block that did not happen, so it is not used,
    # even where its first token equals the new seed
    seq = verified([4, 5, 7, 8], foreseen=[7, 20, 21, 22])
    assert seq.tokens == [9, 3, 4, 5, 7] and seq.phase == "draft"
    assert seq.block is not None and seq.block.tolist() == [7, M, M, M]


def test_a_two_token_block_takes_the_look_ahead_draft_too() -> None:
    seq = Sequence([5, 6], GenerationParams("speculative", 32, block_length=2), SPEC)  # the smallest block
    seq.tokens, seq.cache_length = [9, 3], 7
    start_block(seq, 3, 7)
    assert seq.block is not None
    seq.block[1] = 4
    seq.phase, seq.lookahead_draft = "verify", np.array([8, 20])
    tokens, log_probs = np.array([4, 8]), np.zeros(2)
    SelfSpeculative.update(seq, Picks(tokens, log_probs, tokens, tokens[:, None], log_probs[:, None]))
    assert seq.tokens == [9, 3, 4, 8] and seq.phase == "verify" and seq.block.tolist() == [8, 20]


def test_verify_counts_the_tokens_each_verifying_pass_commits() -> None:
    seq = Sequence([5, 6], GenerationParams("speculative", 32), SPEC)  # blocks of 4
    seq.tokens, seq.cache_length, seq.verify_passes, seq.verified_tokens = [9, 3], 7, 2, 10  # two passes before
    start_block(seq, 3, 7)
    assert seq.block is not None
    seq.block[1:] = [4, 5, 6]
    seq.phase = "verify"
    tokens, log_probs = np.array([4, 5, 7, 8]), np.zeros(4)  # 4 and 5 accepted, 7 for 6: the bonus
    SelfSpeculative.update(seq, Picks(tokens, log_probs, tokens, tokens[:, None], log_probs[:, None]))
    assert seq.tokens == [9, 3, 4, 5, 7]
    assert (seq.verify_passes, seq.verified_tokens) == (3, 13)  # three tokens more: 4, 5 and the bonus 7


def test_the_remasking_budget_is_what_is_left_of_max_remasks_or_of_the_block() -> None:
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, remask_threshold=0.5, max_remasks=3), SPEC)
    start_block(seq, 9, 2)
    seq.block_remasks = 1
    assert BlockDiffusion._remask_budget(seq) == 2
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, remask_threshold=0.5), SPEC)  # at most the block
    start_block(seq, 9, 2)
    seq.block_remasks = 1
    assert BlockDiffusion._remask_budget(seq) == seq.block_length - 1
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, max_remasks=3), SPEC)  # no re-masking asked
    assert BlockDiffusion._remask_budget(seq) == 0


def test_the_last_pass_of_a_block_is_the_max_block_passes_th() -> None:
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, threshold=0.9, max_block_passes=3), SPEC)
    start_block(seq, 9, 2)
    last = []
    for steps in range(4):
        seq.block_steps = steps
        last.append(BlockDiffusion._last_pass(seq))
    assert last == [False, False, True, True]  # the pass after two is the third
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, threshold=0.9), SPEC)  # no limit: never
    start_block(seq, 9, 2)
    seq.block_steps = 1000
    assert not BlockDiffusion._last_pass(seq)


def test_the_pass_cap_commits_every_open_position_with_its_log_prob() -> None:
    # max_block_passes=1: the first pass is the last, so all three open positions are committed whatever their
    # confidence (0.3, under the threshold), each with its own score
    seq = Sequence([5, 6], GenerationParams("diffusion", 16, threshold=0.9, max_block_passes=1, logprobs=1), SPEC)
    seq.tokens = [9]
    start_block(seq, 9, 2)
    seq.phase = "denoise"
    plan = BlockDiffusion.plan(seq)
    assert seq.pending is not None and seq.pending.tolist() == [1, 2, 3] == plan.predict.tolist()
    tokens = np.array([4, 5, 6])
    log_probs = np.log(np.array([0.3, 0.2, 0.1]))
    picks = Picks(tokens, log_probs, tokens, tokens[:, None], log_probs[:, None])
    assert BlockDiffusion.update(seq, picks) == 0
    assert block_of(seq) == [9, 4, 5, 6]
    assert seq.block_scores[1:] == [(float(v), [(t, float(v))]) for t, v in zip(tokens.tolist(), log_probs)]


def denoising_block(params: GenerationParams, spec: TokenSpec = SPEC) -> Sequence:
    """A diffusion sequence whose first block (seed 9) is open and planned: every position but the seed masked."""
    seq = Sequence([5, 6], params, spec)
    seq.tokens = [9]
    start_block(seq, 9, 2)
    seq.phase = "denoise"
    BlockDiffusion.plan(seq)
    return seq


def denoise_with(seq: Sequence, probs: list[float]) -> None:
    """One unguided denoising pass whose choice at open position j is token 100 + j with probability probs[j]."""
    tokens = 100 + np.arange(len(probs))
    log_probs = np.log(np.array(probs))
    assert BlockDiffusion.update(seq, Picks(tokens, log_probs, tokens, tokens[:, None], log_probs[:, None])) == 0


def test_a_confidence_exactly_at_the_threshold_is_committed() -> None:
    seq = denoising_block(GenerationParams("diffusion", 16, threshold=0.5))
    denoise_with(seq, [0.9, 0.5, 0.3])  # position 2 exactly at 0.5, and not the best (always committed)
    assert block_of(seq) == [9, 100, 101, MASK]


def test_with_fixed_steps_ties_go_to_the_earlier_positions() -> None:
    # 31 open positions, 4 steps: 8 committed by the first pass, the most confident; the probability 0.5 is at 12
    # positions, so ties decide: the earlier positions first, whatever the sort's algorithm (numpy's default,
    # unstable, takes position 22 for 21 here)
    spec = dataclasses.replace(SPEC, block_size=32)
    seq = denoising_block(GenerationParams("diffusion", 64, threshold=None, steps=4), spec)
    probs = [(0.5, 0.25, 0.125)[int(c)] for c in "1100110002102202221200211201220"]
    denoise_with(seq, probs)
    assert [j for j, t in enumerate(block_of(seq)) if t not in (MASK, 9)] == [3, 4, 7, 8, 9, 12, 15, 21]


@pytest.mark.parametrize("max_remasks, verify_rows, tentative", [(1, 1, True), (0, 1, False), (1, 0, False)])
def test_a_commit_is_tentative_while_the_block_has_re_masking_budget_and_verifying_rows(
        max_remasks: int, verify_rows: int, tentative: bool) -> None:
    seq = denoising_block(GenerationParams("diffusion", 16, threshold=0.5, remask_threshold=0.4,
                                           max_remasks=max_remasks))
    seq.verify_rows = verify_rows  # what the planner left this sequence
    denoise_with(seq, [0.9, 0.2, 0.2])
    assert seq.tentative is not None and block_of(seq) == [9, 100, MASK, MASK]
    assert seq.tentative.tolist() == [False, tentative, False, False]


def test_each_verifying_row_is_bidirectional_with_only_its_own_token_masked() -> None:
    seq = denoising_block(GenerationParams("diffusion", 16, threshold=0.5, remask_threshold=0.4))
    denoise_with(seq, [0.9, 0.8, 0.2])  # 100 and 101 committed, tentative: the next pass verifies them
    plan = BlockDiffusion.plan(seq)
    assert [int(row.predict[0]) for row in plan.extra] == [1, 2]
    for row in plan.extra:
        j = int(row.predict[0])
        assert not row.causal  # it reads the whole block, as the denoising pass that committed the token did
        assert row.tokens.tolist() == [9 if i == 0 else MASK if i in (j, 3) else 99 + i for i in range(4)]


# --- generate, the batch entry point of the tools and tests: its parameters, limits and runtime ------------------------


@pytest.fixture
def tiny_runtime(tiny_model: Any, tiny_config_dict: dict[str, Any]) -> TorchRuntime:
    return TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict))


@pytest.fixture
def never_ending(tiny_config_dict: dict[str, Any]) -> TokenSpec:
    return dataclasses.replace(TokenSpec.from_config(tiny_config_dict), eos_token_ids=frozenset())


def test_generate_gives_each_prompt_its_own_parameters(tiny_runtime: TorchRuntime, never_ending: TokenSpec) -> None:
    params = [GenerationParams(mode="ar", max_tokens=3), GenerationParams(mode="diffusion", max_tokens=5)]
    assert [len(g.tokens) for g in generate(tiny_runtime, [[1, 5, 6], [1, 9]], params, never_ending)] == [3, 5]


def test_generate_takes_a_request_that_fills_max_position_embeddings_exactly(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec
) -> None:
    limit, block = never_ending.max_position_embeddings, never_ending.block_size
    params = GenerationParams(mode="ar", max_tokens=2)
    prompt = [1] + [5] * (limit - block - params.max_tokens - 1)  # prompt + answer + one block of look-ahead = limit
    assert len(generate(tiny_runtime, [prompt], params, never_ending)[0].tokens) == 2
    with pytest.raises(ValueError) as raised:
        generate(tiny_runtime, [prompt + [5]], params, never_ending)
    assert str(raised.value) == (f"prompt + max_tokens + block_length = {limit + 1} positions exceeds the model's "
                                 f"max_position_embeddings ({limit})")


def test_generate_reuses_a_cache_that_is_already_large_enough(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts, params = [[1, 5, 6], [1, 9]], GenerationParams(mode="ar", max_tokens=3)
    first = generate(tiny_runtime, prompts, params, never_ending)
    assert (tiny_runtime.slots, tiny_runtime.context) == (2, 3 + 3 + never_ending.block_size)  # exactly the need
    allocations: list[tuple[int, int]] = []
    allocate = tiny_runtime.allocate

    def counted(slots: int, context: int, pass_tokens: int | None = None) -> None:
        allocations.append((slots, context))
        allocate(slots, context, pass_tokens)

    monkeypatch.setattr(tiny_runtime, "allocate", counted)
    assert [g.tokens for g in generate(tiny_runtime, prompts, params, never_ending)] == [g.tokens for g in first]
    assert allocations == []


def test_generate_keeps_each_pass_within_the_runtimes_profile(tiny_runtime: TorchRuntime, never_ending: TokenSpec) -> None:
    block = never_ending.block_size
    prompt, params = list(range(1, 3 * block)), GenerationParams(mode="ar", max_tokens=4)
    whole = generate(tiny_runtime, [prompt], params, never_ending)[0]
    tiny_runtime.profile = Profile.from_limits(block, max_batch=2, max_context=64, max_tokens=block)
    chunked = generate(tiny_runtime, [prompt], params, never_ending)[0]  # passes of more than `block` tokens refused
    assert chunked.tokens == whole.tokens
    assert chunked.num_forwards == whole.num_forwards + 2  # the prompt prefilled in three passes instead of one


class ProtocolOnly:
    """A `dlm.runtime.Runtime` with the protocol's members and nothing else (no profile, no draft adapter)."""

    def __init__(self, inner: TorchRuntime) -> None:
        self.inner, self.layout = inner, inner.layout

    slots = property(lambda self: self.inner.slots)
    context = property(lambda self: self.inner.context)

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None:
        self.inner.allocate(slots, context, pass_tokens)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        self.inner.commit(slots, starts, counts)


@pytest.mark.parametrize("mode", ["ar", "speculative", "diffusion"])
def test_generate_runs_on_a_runtime_with_only_the_protocols_members(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec, mode: str
) -> None:
    prompts, params = [[1, 5, 6], [1, 9]], GenerationParams(mode=mode, max_tokens=5)
    want = [g.tokens for g in generate(tiny_runtime, prompts, params, never_ending)]
    assert [g.tokens for g in generate(ProtocolOnly(tiny_runtime), prompts, params, never_ending)] == want


def test_generate_reports_the_tokens_speculative_verifying_passes_committed(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec
) -> None:
    out = generate(tiny_runtime, [[1, 5, 6]], GenerationParams(mode="speculative", max_tokens=12), never_ending)[0]
    # the prefill commits the first token, every other one is committed by a verifying pass
    assert out.verify_passes >= 1 and out.verified_tokens == out.num_tokens - 1


class EndTokenFirst(ProtocolOnly):
    """A runtime whose every prediction ranks `eos` first (the model's own candidates permuted): an answer then
    ends at the first position where an end token may be chosen."""

    def __init__(self, inner: TorchRuntime, eos: int) -> None:
        super().__init__(inner)
        self.eos = eos

    def forward(self, *args: Any, **kwargs: Any) -> Candidates:
        got = self.inner.forward(*args, **kwargs)
        tokens = got.tokens.copy()
        where_eos = tokens == self.eos
        tokens[where_eos] = tokens[..., :1].repeat(tokens.shape[-1], axis=-1)[where_eos]  # eos swaps with the top
        tokens[..., 0] = self.eos
        return Candidates(tokens, got.logits, got.logsumexp)


@pytest.mark.parametrize("mode", ["ar", "speculative", "diffusion"])
def test_an_end_token_the_model_prefers_everywhere_comes_right_after_min_tokens(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec, mode: str
) -> None:
    eos = 3
    spec, runtime = dataclasses.replace(never_ending, eos_token_ids=frozenset({eos})), EndTokenFirst(tiny_runtime, eos)
    block = spec.block_size
    for min_tokens in (1, 2, block - 1, block, block + 1, 2 * block + 2):
        out = generate(runtime, [[1, 5, 6]], GenerationParams(mode=mode, max_tokens=40, min_tokens=min_tokens), spec)[0]
        assert (len(out.tokens), out.finish_reason) == (min_tokens, "eos"), min_tokens
        assert eos not in out.tokens


def test_only_a_runtime_that_has_a_draft_adapter_gets_the_look_ahead_row(tiny_runtime: TorchRuntime) -> None:
    speculative = GenerationParams(mode="speculative")
    assert not look_ahead_for(speculative, ProtocolOnly(tiny_runtime))  # says nothing of an adapter: has none
    assert not look_ahead_for(speculative, tiny_runtime)
    tiny_runtime.has_draft_adapter = True
    assert look_ahead_for(speculative, tiny_runtime)
    assert not look_ahead_for(dataclasses.replace(speculative, draft_adapter=False), tiny_runtime)
    assert not look_ahead_for(GenerationParams(mode="diffusion"), tiny_runtime)


@pytest.mark.parametrize("planned", [True, False], ids=["planned passes", "one pass"])
def test_penalised_rows_of_different_modes_in_one_pass_decode_as_they_do_alone(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec, planned: bool
) -> None:
    """With the pass planner (the runtime has a profile) and without (every row in one pass: a causal row of 8
    predictions beside a row of 16, whose padding predictions the penalties must leave alone)."""
    runtime = tiny_runtime if planned else ProtocolOnly(tiny_runtime)
    penalised = GenerationParams(max_tokens=17, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)
    block = never_ending.block_size  # the diffusion rows predict more positions than the speculative ones verify
    params = [dataclasses.replace(penalised, mode="ar"),
              dataclasses.replace(penalised, mode="diffusion", block_length=2 * block, threshold=None,
                                  steps=2 * block - 1),
              dataclasses.replace(penalised, mode="speculative", block_length=block)]
    prompts = [[1, 5, 6], [1, 9, 9, 4], [1, 7]]
    together = generate(runtime, prompts, params, never_ending)
    for prompt, p, got in zip(prompts, params, together):
        assert got.tokens == generate(runtime, [prompt], p, never_ending)[0].tokens, p.mode


# --- a grammar's row beside others in one pass, and sampled ------------------------------------------------------
ALLOWED = (20, 40, 70, 100)  # in every mask word of the tiny model's 128 tokens


def guided(tiny_runtime: TorchRuntime, max_tokens: int, **params: Any) -> GenerationParams:
    """`ar` under a grammar that allows ALLOWED at every one of `max_tokens` steps."""
    words = tiny_runtime.bitmask_words
    return GenerationParams(mode="ar", max_tokens=max_tokens,
                            guide=ScriptedGuide((set(ALLOWED),) * max_tokens, words), **params)


def test_a_penalised_row_keeps_its_penalties_beside_a_grammars_row(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec
) -> None:
    penalised = GenerationParams(mode="ar", max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0)
    prompts = [[1, 5, 6], [1, 9, 9, 4]]
    alone = generate(tiny_runtime, prompts[:1], penalised, never_ending)[0].tokens
    assert alone != generate(tiny_runtime, prompts[:1], GenerationParams(mode="ar", max_tokens=8),
                             never_ending)[0].tokens  # the penalties change this answer
    together = generate(tiny_runtime, prompts, [penalised, guided(tiny_runtime, 8)], never_ending)
    assert together[0].tokens == alone
    assert set(together[1].tokens) <= set(ALLOWED)


def test_a_grammars_row_samples_among_the_allowed_tokens_only_at_any_temperature(
    tiny_runtime: TorchRuntime, never_ending: TokenSpec
) -> None:
    """The graph gives an excluded token a logit of -1e30; at a temperature near 1e30 (any finite one is valid) that
    no longer rules it out, so the host excludes it too. And sampling under a grammar still samples: not always the
    best allowed candidate."""
    greedy = generate(tiny_runtime, [[1, 5, 6]], guided(tiny_runtime, 12), never_ending)[0].tokens
    for temperature in (1.0, 1e30):
        sampled = [generate(tiny_runtime, [[1, 5, 6]], guided(tiny_runtime, 12, temperature=temperature, seed=seed),
                            never_ending)[0].tokens for seed in range(3)]
        assert all(set(tokens) <= set(ALLOWED) for tokens in sampled), (temperature, sampled)
        assert any(tokens != greedy for tokens in sampled), (temperature, sampled, greedy)


# --- plan_step: the planner's limits on each sequence, and which prefill chunks may share a pass ------------------
def decoding_ar() -> Sequence:
    seq = Sequence([5, 6], GenerationParams("ar", 8), SPEC)
    seq.tokens, seq.cache_length, seq.phase = [7], 2, "decode"
    return seq


def test_a_prompts_last_chunk_shares_a_pass_and_its_earlier_chunks_do_not() -> None:
    limits = PassLimits(max_batch=4, max_tokens=8, max_context=64, max_block=4, token_budget=32, prefill_chunk=8)
    decoding, short = decoding_ar(), Sequence([5], GenerationParams("ar", 8), SPEC)  # one row of one token each
    assert [group for group, _ in plan_step([decoding, short], limits)] == [[decoding, short]]
    # 20 prompt tokens: chunks of 8, 8 and 4; beside it a prompt of 8 (its only chunk), as wide
    long, last = Sequence(list(range(5, 25)), GenerationParams("ar", 8), SPEC), \
        Sequence(list(range(5, 13)), GenerationParams("ar", 8), SPEC)
    passes = plan_step([long, last], limits)
    assert sorted([id(s) for s in group] for group, _ in passes) == sorted([[id(long)], [id(last)]])
    assert [len(plans[0].tokens) for _, plans in passes] == [8, 8]


def verifying_with_look_ahead() -> Sequence:
    seq = Sequence([5, 6], GenerationParams("speculative", 32), SPEC)  # blocks of 4
    seq.tokens, seq.lookahead = [3, 4], True
    start_block(seq, 4, 3)
    seq.cache_length, seq.phase = 3, "verify"
    return seq


def test_the_planner_gives_each_sequence_its_limits() -> None:
    """A look-ahead row runs only where two rows fit a pass: the sequence must know the limits when it plans."""
    passes = plan_step([verifying_with_look_ahead()], PassLimits(2, 8, 64, 4, 16))
    assert len(passes[0][1][0].extra) == 1  # room for the look-ahead row
    passes = plan_step([verifying_with_look_ahead()], PassLimits(1, 8, 64, 4, 16))
    assert passes[0][1][0].extra == []


@pytest.mark.parametrize(("wanted", "max_batch", "budget", "allowed"), [
    (4, 8, 64, 4),  # within both bounds
    (4, 3, 64, 2),  # a pass of 3 rows: the row itself and 2 verifying rows
    (4, 8, 12, 2),  # a budget of 12 tokens: 3 rows of a block of 4
    (4, 1, 64, 0),  # one row a pass: none
])
def test_the_planner_caps_re_maskings_verifying_rows_to_what_fits_a_pass(
    wanted: int, max_batch: int, budget: int, allowed: int
) -> None:
    seq = Sequence([5, 6], GenerationParams("diffusion", 8), SPEC)  # blocks of 4
    seq.verify_rows = wanted
    plan_step([seq], PassLimits(max_batch, 8, 64, 4, budget))
    assert seq.verify_rows == allowed


# --- Sequence: an empty prompt, the mask rows a grammar gives, log probs without alternatives ---------------------
def test_an_empty_prompt_is_refused_with_what_is_needed() -> None:
    with pytest.raises(ValueError) as refused:
        Sequence([], GenerationParams("ar", 4), SPEC)
    assert str(refused.value) == "the prompt is empty: at least one token is needed"


def test_a_bidirectional_rows_grammar_mask_goes_to_its_first_prediction_only() -> None:
    """The grammar can judge the first open position only: it gets the matcher's mask; the predictions after it
    are left unconstrained (-1: every bit set), for the frontier to check one by one (diffusion) or the verifying
    pass (speculative drafts)."""
    allowed = np.array([(1 << 3) | (1 << 4)], dtype=np.int32)
    diffusion = guided_block([9, {3, 4}, {3, 4}])
    drafting = Sequence([5, 6], GenerationParams("speculative", 32, guide=ScriptedGuide((9, {3, 4}, {3, 4}))), GUIDED)
    drafting.tokens = [9]
    start_block(drafting, 9, 2)
    drafting.phase = "draft"
    for seq, plan in ((diffusion, BlockDiffusion.plan(diffusion)), (drafting, SelfSpeculative.plan(drafting))):
        masks = seq.allowed_masks(plan)
        assert masks is not None and masks.dtype == np.int32 and masks.shape == (7, 1), seq.params.mode
        assert masks[0].tolist() == allowed.tolist() and (masks[1:] == -1).all(), seq.params.mode


def test_log_probs_without_alternatives(tiny_runtime: TorchRuntime, never_ending: TokenSpec) -> None:
    out = generate(tiny_runtime, [[1, 5, 6]], GenerationParams("ar", 4, logprobs=0), never_ending)[0]
    assert len(out.logprobs) == 4 and out.top_logprobs == [[]] * 4


@pytest.mark.parametrize("fields, message", [
    ({"mode": "diffusion", "remask_threshold": 0.5}, "remask_threshold cannot be combined with guided decoding: a "
                                                     "constrained block is committed left to right and never "
                                                     "re-masked"),
    ({"ignore_eos": True}, "ignore_eos cannot be combined with guided decoding: the grammar decides where the answer "
                           "ends"),
])
def test_what_a_grammar_cannot_be_combined_with_is_refused_with_why(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        GenerationParams(**fields, guide=ScriptedGuide((3,))).validate()
    assert str(raised.value) == message
