"""The pass planner (`dlm.planner`, `refine.plan_step`): every pass inside the artifact's profile and the token budget,
long prompts prefilled in chunks, little padding, and the tokens of a request independent of how rows were grouped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm.contract import Profile
from dlm.planner import MAX_PADDING, PassLimits, group_rows
from dlm.refine import GenerationParams, Sequence, TokenSpec, generate, plan_step, step
from dlm.runtime import CacheLayout, TorchRuntime

LIMITS = PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16, token_budget=32)
PROFILE = Profile.from_limits(block_size=8, max_batch=4, max_context=96, max_tokens=24, max_block=16)


def check_groups(sizes: list[tuple[int, int]], groups: list[list[int]], limits: PassLimits) -> None:
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        t, p = max(sizes[i][0] for i in g), max(sizes[i][1] for i in g)
        assert len(g) <= limits.max_batch and t <= limits.max_tokens and p + t <= limits.max_context
        assert len(g) * t <= limits.token_budget
        if len(g) > 1:
            assert sum(sizes[i][0] for i in g) >= (1 - MAX_PADDING) * len(g) * t


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 8, 16, 24]), st.integers(0, 72)), min_size=1, max_size=12))
def test_every_group_fits_the_limits_with_little_padding(sizes):
    check_groups(sizes, group_rows(sizes, LIMITS), LIMITS)


def test_rows_that_cannot_share_a_pass_go_in_separate_passes():
    # a long prefill chunk next to a row deep in its answer: together P + T = 80 + 24 > 96
    groups = group_rows([(1, 80), (24, 0), (1, 10)], LIMITS)
    assert sorted(map(sorted, groups)) == [[0, 2], [1]]


def test_prefill_chunks_and_decoding_rows_never_share_a_pass():
    sizes = [(16, 0, 1, 1), (16, 20, 1, 0), (16, 30, 1, 0)]  # a chunk and two decoding blocks of the same size
    groups = group_rows(sizes, LIMITS)
    assert sorted(map(sorted, groups)) == [[0], [1, 2]]


def test_a_step_runs_its_passes_fewest_tokens_first():
    groups = group_rows([(24, 0), (1, 10), (16, 0), (1, 12)], LIMITS)
    widths = [max([(24, 0), (1, 10), (16, 0), (1, 12)][i][0] for i in g) for g in groups]
    assert widths == sorted(widths) and widths[0] == 1


def test_the_prefill_chunk_can_be_smaller_than_the_budget():
    limits = PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16, token_budget=32, prefill_chunk=8)
    assert limits.chunk == 8
    assert PassLimits(4, 24, 96, 16, 32, prefill_chunk=100).chunk == 24  # never beyond the artifact's tokens
    with pytest.raises(ValueError, match="prefill_chunk must be at least 1"):
        PassLimits(4, 24, 96, 16, 32, prefill_chunk=0)


def test_a_token_budget_below_one_block_is_refused():
    with pytest.raises(ValueError, match="token budget .* at least one block .* raise max_num_tokens"):
        PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16, token_budget=8)


@pytest.fixture
def runtime(tiny_model, tiny_config_dict):
    """The tiny model behind the profile of a small artifact: a pass outside it raises, naming the axis."""
    runtime = TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict))
    runtime.profile = PROFILE
    return runtime


@pytest.fixture
def spec(tiny_config_dict):
    return dataclasses.replace(TokenSpec.from_config(tiny_config_dict), eos_token_ids=frozenset())


def recorded_passes(runtime) -> list[tuple[int, int, int, int]]:
    """(B, T, P, N) of every pass from now on."""
    shapes: list[tuple[int, int, int, int]] = []
    forward = runtime.forward

    def record(slots, input_ids, position_ids, new_mask, cache_lengths, causal, logit_positions, *rest):
        shapes.append((*input_ids.shape, int(cache_lengths.max(initial=0)), logit_positions.shape[1]))
        return forward(slots, input_ids, position_ids, new_mask, cache_lengths, causal, logit_positions, *rest)

    runtime.forward = record
    return shapes


def test_a_long_prompt_is_prefilled_in_chunks(runtime, spec):
    shapes = recorded_passes(runtime)
    prompt = list(range(5, 65))  # 60 tokens: chunks of 24, 24 and 12
    alone = generate(runtime, [prompt], GenerationParams("ar", 8), spec, LIMITS)[0]
    assert [t for _, t, _, _ in shapes[:3]] == [24, 24, 12] and [p for _, _, p, _ in shapes[:3]] == [0, 24, 48]
    assert alone.num_forwards == 3 + 7  # three prefill passes, then one per token after the first
    whole = generate(TorchRuntime(runtime.module, runtime.layout), [prompt], GenerationParams("ar", 8), spec)[0]
    assert whole.tokens == alone.tokens  # the same tokens as a prefill in one pass


MODES = [GenerationParams("ar", 10), GenerationParams("diffusion", 10, threshold=0.7),
         GenerationParams("diffusion", 10, threshold=None, steps=2), GenerationParams("speculative", 10),
         GenerationParams("diffusion", 10, threshold=0.5, block_length=16)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 70), st.integers(0, len(MODES) - 1), st.integers(0, 6)),
                min_size=2, max_size=6))
def test_tokens_do_not_depend_on_grouping_or_arrival(runtime, spec, requests):
    """Random mixes of prompt lengths, modes and arrival steps, decoded together under the planner with every pass
    inside the profile (the runtime refuses any other), give each request the tokens it gets alone."""
    rng = np.random.default_rng(len(requests))
    prompts = [rng.integers(5, 90, n).tolist() for n, _, _ in requests]
    params = [MODES[m] for _, m, _ in requests]
    alone = [generate(runtime, [p], q, spec, LIMITS)[0].tokens for p, q in zip(prompts, params)]
    shapes = recorded_passes(runtime)
    runtime.allocate(len(requests), LIMITS.max_context)
    seqs = [Sequence(p, q, spec, slot=i) for i, (p, q) in enumerate(zip(prompts, params))]
    arrivals = [a for _, _, a in requests]
    live: list[Sequence] = []
    for tick in range(10_000):
        live += [s for s, a in zip(seqs, arrivals) if a == tick]
        for group, plans in plan_step(live, LIMITS):
            step(runtime, group, plans=plans)
        live = [s for s in live if not s.done]
        if not live and tick >= max(arrivals):
            break
    assert [s.output for s in seqs] == alone
    for b, t, p, n in shapes:
        PROFILE.check(b, t, p, n)
        assert b * t <= LIMITS.token_budget
