"""Prefix caching (issue 24): a request takes over the free slot whose resident keys and values share the longest
prefix with its prompt and prefills only the rest. At temperature 0 every mode gives the same tokens with reuse on
and off, whatever the prompts share, the arrival order, the conversation turns or the cancellations; what is reused
is exactly what the slot holds; a request that shares nothing runs the passes it ran before; a failed pass or a
change of the weights never leaves keys and values to reuse."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_tiny_model
from dlm.kv_cache import MIN_COPY, KVCache, shared_prefix
from dlm.planner import PassLimits
from dlm.refine import GenerationParams, TokenSpec
from dlm.runtime import CacheLayout, TorchRuntime
from dlm.scheduler import Job, Scheduler
from export.adapter import DraftAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = 2
CONTEXT = 192
# every mode and decoding setting the loop has; the runtime carries a draft adapter, so the speculative setting
# that uses it also runs the look-ahead row
SETTINGS = [
    GenerationParams("ar", max_tokens=9),
    GenerationParams("diffusion", max_tokens=16, threshold=0.9),
    GenerationParams("diffusion", max_tokens=13, threshold=None, steps=3),
    GenerationParams("diffusion", max_tokens=16, threshold=0.6, remask_threshold=0.5, block_length=4),
    GenerationParams("speculative", max_tokens=14),
    GenerationParams("speculative", max_tokens=11, draft_adapter=False),
    GenerationParams("diffusion", max_tokens=12, threshold=0.9, min_tokens=6, block_length=4),
]
SETTING_IDS = ["ar", "diffusion-threshold", "diffusion-steps", "remask", "speculative-lookahead",
               "speculative-base-draft", "diffusion-min-tokens"]


def adapted_model():
    """The random tiny model with a random draft-only LoRA attached (speculative look-ahead rows need one)."""
    model = random_tiny_model()
    generator = torch.Generator().manual_seed(5)
    c, rank = model.config, 4
    a = tuple(torch.randn(rank, c.num_attention_heads * c.head_dim, generator=generator) * 0.3
              for _ in range(c.num_hidden_layers))
    b = tuple(torch.randn(c.hidden_size, rank, generator=generator) * 0.3 for _ in range(c.num_hidden_layers))
    model.attach_draft_adapter(DraftAdapter(Path("random"), rank, 16.0, a, b, ""))
    return model


@pytest.fixture(scope="module")
def model():
    return adapted_model()


@pytest.fixture(scope="module")
def layout(model):
    c = model.config
    return CacheLayout(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)


@pytest.fixture(scope="module")
def spec(model):
    from conftest import TINY_CONFIG

    return dataclasses.replace(TokenSpec.from_config(TINY_CONFIG), eos_token_ids=frozenset({EOS}))


def limits(chunk: int | None) -> PassLimits:
    return PassLimits(max_batch=8, max_tokens=64, max_context=CONTEXT, max_block=16, token_budget=64,
                      prefill_chunk=chunk)


class Recorder:
    """A consumer that cancels itself after `cancel_after` updates, if given."""

    def __init__(self, cancel_after: int | None = None):
        self.updates, self.cancel_after = 0, cancel_after
        self.done = threading.Event()
        self.errors: list[Exception] = []

    def cancelled(self) -> bool:
        return self.cancel_after is not None and self.updates >= self.cancel_after

    def update(self, job: Job) -> bool:
        self.updates += 1
        if job.finished:
            self.done.set()
        return False

    def fail(self, job: Job, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()


class Server:
    """A scheduler over its own runtime (its own cache), fed wave by wave."""

    def __init__(self, runtime, spec: TokenSpec, caching: bool, max_live: int, chunk: int | None = 8):
        self.scheduler = Scheduler(runtime, spec, max_live=max_live, max_queue=64, context=CONTEXT,
                                   limits=limits(chunk), prefix_caching=caching)

    def wave(self, requests: list[tuple[list[int], GenerationParams, int | None]]) -> list[Job]:
        """Submit every request in order, at once, and wait for all of them to end."""
        jobs = [self.scheduler.submit(prompt, params, Recorder(cancel)) for prompt, params, cancel in requests]
        for job in jobs:
            consumer = job.consumer
            assert isinstance(consumer, Recorder)
            assert consumer.done.wait(60), "a request did not end"
            assert not consumer.errors or consumer.cancel_after is not None, consumer.errors
        return jobs

    def stop(self) -> None:
        self.scheduler.stop()


def outcome(job: Job) -> tuple[list[int], str | None]:
    return list(job.seq.output), job.outcome


# --- the slot index, on its own -----------------------------------------------------------------------------------
def cache(slots: int = 4, context: int = 64) -> KVCache:
    return KVCache(np.zeros((slots, 1, 2, 1, context, 1), np.float32))


def test_shared_prefix():
    assert shared_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert shared_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert shared_prefix(np.array([], dtype=np.int64), np.array([1])) == 0
    assert shared_prefix(np.array([7]), np.array([1])) == 0


def test_claim_takes_over_a_slot_whose_whole_content_the_prompt_extends():
    kv = cache()
    long = list(range(3, 3 + 40))
    kv.retain(0, long[:20])
    kv.retain(1, long)
    kv.retain(2, long[:30] + [99] * 5)
    assert kv.claim([0, 1, 2, 3], long + [5]) == (1, 40)  # an earlier turn: taken over, no copy
    assert 1 not in kv.resident  # the slot is the request's now
    kv.retain(1, long)
    assert kv.claim([0, 1, 2, 3], long) == (1, 39)  # the whole prompt matches: its last token still runs


def test_a_prompt_branching_off_inside_a_slot_copies_the_shared_part_and_leaves_the_slot_as_it_was():
    kv = cache()
    kv.cache[:] = np.arange(4)[:, None, None, None, None, None]  # each slot's positions hold its number
    long = list(range(3, 3 + 40))
    kv.retain(0, long[:20])
    kv.retain(2, long[:30] + [99] * 5)
    assert kv.claim([0, 1, 2, 3], long[:30] + [7, 8]) == (1, 30)  # the empty slot, the 30 shared copied into it
    assert (kv.cache[1, ..., :30, :] == 2).all() and (kv.cache[1, ..., 30:, :] == 1).all()
    assert set(kv.resident) == {0, 2} and (kv.cache[2] == 2).all()


def test_a_short_match_takes_an_empty_slot_then_the_least_recently_used_one():
    kv = cache()
    kv.retain(0, [1] + [5] * 30)
    kv.retain(1, [1] + [6] * 30)
    prompt = [1] + [7] * 30  # shares only the first token with both
    assert kv.claim([0, 1, 2], prompt) == (2, 0)  # the empty slot: both contents stay for the prompts that share them
    kv.retain(2, [1] + [8] * 30)
    slot, reused = kv.claim([0, 1, 2], prompt)
    assert (slot, reused) == (0, 1)  # no empty slot: the least recently released, and what little it shares
    assert set(kv.resident) == {1, 2}
    long = [1] + [6] * (MIN_COPY + 2)
    assert kv.claim([1, 2], long) == (1, MIN_COPY + 2)


def test_without_a_prompt_nothing_is_looked_up():
    kv = cache()
    kv.retain(0, list(range(40)))
    slot, reused = kv.claim([0, 1], None)
    assert (slot, reused) == (1, 0)


def test_a_commit_to_an_unclaimed_slot_forgets_its_content():
    kv = cache()
    kv.retain(0, list(range(40)))
    kv.retain(1, list(range(40)))
    present = np.ones((1, 1, 2, 1, 3, 1), np.float32)
    kv.commit(np.array([0]), np.array([0]), np.array([3]), present)  # e.g. `refine.generate` on the same runtime
    assert set(kv.resident) == {1}
    kv.commit(np.array([1]), np.array([0]), np.array([0]), present)  # a bidirectional pass writes nothing
    assert set(kv.resident) == {1}


def test_other_weights_drop_every_resident_content():
    kv = cache()
    kv.check_weights("a")
    kv.retain(0, list(range(40)))
    kv.check_weights("a")
    assert 0 in kv.resident
    kv.check_weights("b")
    assert not kv.resident


# --- through the scheduler ----------------------------------------------------------------------------------------
def test_reuse_is_what_the_slot_holds_prompt_and_answer(model, layout, spec):
    """A second turn reuses the first turn's prompt and every answer token a causal pass wrote; a prompt that
    branches off reuses the shared part; the tokens equal those without reuse."""
    system = list(range(10, 10 + 40))
    params = GenerationParams("ar", max_tokens=9)
    on = Server(TorchRuntime(model, layout), spec, caching=True, max_live=1)
    off = Server(TorchRuntime(model, layout), spec, caching=False, max_live=1)
    try:
        first = [on.wave([(system + [60, 61], params, None)])[0], off.wave([(system + [60, 61], params, None)])[0]]
        assert first[0].seq.cached_tokens == 0 and first[1].seq.cached_tokens is None
        answer = first[0].seq.output
        assert answer == first[1].seq.output
        written = len(system) + 2 + len(first[0].seq.tokens) - 1  # ar: the last token is not in the cache yet
        assert first[0].seq.resident == (system + [60, 61] + first[0].seq.tokens)[:written]
        turn = system + [60, 61] + answer + [70, 71]
        second = [server.wave([(turn, params, None)])[0] for server in (on, off)]
        assert second[0].seq.cached_tokens == min(written, len(turn) - 1)
        assert outcome(second[0]) == outcome(second[1])
        branch = system[:30] + [90, 91, 92]
        third = [server.wave([(branch, params, None)])[0] for server in (on, off)]
        assert third[0].seq.cached_tokens == 30
        assert outcome(third[0]) == outcome(third[1])
    finally:
        on.stop()
        off.stop()


@pytest.mark.parametrize("setting", range(len(SETTINGS)), ids=SETTING_IDS)
def test_a_branch_copies_the_shared_part_and_the_conversation_keeps_its_slot(model, layout, spec, setting):
    """Turn one of a conversation, then another user's request on the same system prompt (it copies the system
    prompt into a free slot), then turn two (it takes over turn one's slot, its answer included): in every mode the
    tokens equal those without reuse."""
    system = list(range(10, 10 + 32))
    params = SETTINGS[setting]
    got = []
    for caching in (True, False):
        server = Server(TorchRuntime(model, layout), spec, caching=caching, max_live=2)
        try:
            first = server.wave([(system + [60, 61], params, None)])[0]
            other = server.wave([(system + [62], params, None)])[0]
            turn = server.wave([(system + [60, 61] + first.seq.output + [70], params, None)])[0]
        finally:
            server.stop()
        got.append([(outcome(job), job.seq.cached_tokens) for job in (first, other, turn)])
    on, off = got
    assert [o for o, _ in on] == [o for o, _ in off]
    assert on[1][1] == len(system)
    assert on[2][1] == len(first.seq.resident)  # the first turn's whole content: prompt and written answer


class Counting:
    """Records every pass's input shape and cache lengths; everything else is the wrapped runtime's."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.passes: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def forward(self, slots, input_ids, position_ids, new_mask, cache_lengths, *args):
        self.passes.append((input_ids.shape, int(new_mask.sum()), cache_lengths.tolist()))
        return self.runtime.forward(slots, input_ids, position_ids, new_mask, cache_lengths, *args)


def test_a_request_that_shares_nothing_runs_the_same_passes(model, layout, spec):
    rng = np.random.default_rng(3)
    prompts = [[first] + rng.integers(3, 99, 30).tolist() for first in (5, 6, 7, 8)]
    assert all(shared_prefix(np.array(a), np.array(b)) == 0 for a in prompts for b in prompts if a is not b)
    passes = []
    for caching in (True, False):
        runtime = Counting(TorchRuntime(model, layout))
        server = Server(runtime, spec, caching=caching, max_live=1)
        try:
            jobs = [server.wave([(p, SETTINGS[1], None)])[0] for p in prompts]
        finally:
            server.stop()
        assert all(job.seq.cached_tokens == (0 if caching else None) for job in jobs)
        passes.append(runtime.passes)
    assert passes[0] == passes[1]


def test_a_long_shared_prefix_skips_its_prefill(model, layout, spec):
    """The prefill after a reused prefix runs only the chunks the prompt's own prefill would have run after it."""
    system = list(range(10, 10 + 64))
    runtime = Counting(TorchRuntime(model, layout))
    server = Server(runtime, spec, caching=True, max_live=1, chunk=16)
    try:
        server.wave([(system + [60], SETTINGS[0], None)])
        runtime.passes.clear()
        job = server.wave([(system + [61, 62, 63], SETTINGS[0], None)])[0]
    finally:
        server.stop()
    assert job.seq.cached_tokens == 64
    prefill = runtime.passes[0]
    assert prefill[1] == 3 and prefill[2] == [64]  # one pass of the 3 new prompt tokens after 64 cached positions


def test_after_a_reused_prefix_the_rest_is_prefilled_in_chunks(model, layout, spec):
    system = list(range(10, 10 + 40))
    runtime = Counting(TorchRuntime(model, layout))
    server = Server(runtime, spec, caching=True, max_live=1, chunk=16)
    try:
        server.wave([(system + [60], SETTINGS[0], None)])
        runtime.passes.clear()
        job = server.wave([(system + list(range(61, 91)), SETTINGS[0], None)])[0]  # 70 tokens, 40 cached
    finally:
        server.stop()
    assert job.seq.cached_tokens == 40
    assert [(tokens, past) for _, tokens, past in runtime.passes[:2]] == [(16, [40]), (14, [56])]


def test_a_failed_pass_leaves_nothing_to_reuse(model, layout, spec):
    class Failing(Counting):
        fail = False

        def forward(self, *args):
            if self.fail:
                raise RuntimeError("injected fault")
            return super().forward(*args)

    system = list(range(10, 10 + 40))
    runtime = Failing(TorchRuntime(model, layout))
    server = Server(runtime, spec, caching=True, max_live=1)
    try:
        server.wave([(system + [60], SETTINGS[0], None)])  # leaves system + answer resident
        runtime.fail = True
        job = server.scheduler.submit(system + [61], SETTINGS[0], Recorder())
        assert job.consumer.done.wait(30) and job.outcome == "error"  # type: ignore[attr-defined]
        assert job.seq.cached_tokens == 40
        runtime.fail = False
        again = server.wave([(system + [62], SETTINGS[0], None)])[0]
    finally:
        server.stop()
    assert again.seq.cached_tokens == 0


def test_weights_changed_in_place_are_never_served_stale_keys(layout, spec):
    model = adapted_model()
    system = list(range(10, 10 + 40))
    runtime = TorchRuntime(model, layout)
    server = Server(runtime, spec, caching=True, max_live=1)
    try:
        server.wave([(system + [60], SETTINGS[0], None)])
        assert server.wave([(system + [61], SETTINGS[0], None)])[0].seq.cached_tokens == 40
        with torch.no_grad():
            model.encoder.layers[0].self_attn.v_proj.weight.mul_(1.5)  # e.g. weights reloaded in place
        job = server.wave([(system + [62], SETTINGS[4], None)])[0]
        assert job.seq.cached_tokens == 0
        fresh = Server(TorchRuntime(model, layout), spec, caching=False, max_live=1)
        try:
            assert outcome(fresh.wave([(system + [62], SETTINGS[4], None)])[0]) == outcome(job)
        finally:
            fresh.stop()
    finally:
        server.stop()


# --- the property: the same tokens with reuse on and off ----------------------------------------------------------
token = st.integers(3, 99)  # below the mask id (100), the end token (2) excluded from prompts
request = st.tuples(
    st.integers(0, 2),  # which shared prefix
    st.sampled_from([0, 20, 30, 40, 48]),  # how much of it
    st.lists(token, min_size=1, max_size=10),  # its own tail
    st.integers(0, len(SETTINGS) - 1),
    st.one_of(st.none(), st.integers(1, 3)),  # cancelled after that many updates
)
turn = st.tuples(st.lists(token, min_size=1, max_size=8), st.integers(0, len(SETTINGS) - 1))
workload = st.fixed_dictionaries({
    "prefixes": st.lists(st.lists(token, min_size=48, max_size=48), min_size=3, max_size=3),
    "waves": st.lists(st.lists(request, max_size=3), min_size=1, max_size=5),
    "conversations": st.lists(st.lists(turn, min_size=1, max_size=3), max_size=2),
    "order": st.randoms(use_true_random=False),
    "max_live": st.integers(2, 4),
    "chunk": st.sampled_from([None, 8, 13]),
})


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(workload)
def test_the_same_tokens_with_reuse_on_and_off(model, layout, spec, case):
    """Waves of requests (random prompts sharing random prefixes of three random system prompts, every mode,
    some cancelled) and multi-turn conversations (each turn resends the earlier turns and their answers), each wave
    submitted in a random order to a scheduler with reuse and one without, slots taken over and reused across
    waves: every request gets the same tokens and the same outcome."""
    servers = [Server(TorchRuntime(model, layout), spec, caching, case["max_live"], case["chunk"])
               for caching in (True, False)]
    histories = [list(case["prefixes"][i % 3][:20 + 7 * i]) for i in range(len(case["conversations"]))]
    rounds = max([len(case["waves"]), *(len(c) for c in case["conversations"])])
    cached = 0
    try:
        for r in range(rounds):
            batch = []
            for which, length, tail, setting, cancel in (case["waves"][r] if r < len(case["waves"]) else []):
                batch.append((case["prefixes"][which][:length] + tail, SETTINGS[setting], cancel))
            talking = [i for i, c in enumerate(case["conversations"]) if r < len(c)]
            for i in talking:
                user, setting = case["conversations"][i][r]
                histories[i] += user
                batch.append((list(histories[i]), SETTINGS[setting], None))
            order = list(range(len(batch)))
            case["order"].shuffle(order)
            results = [server.wave([batch[j] for j in order]) for server in servers]
            assert [outcome(job) for job in results[0]] == [outcome(job) for job in results[1]]
            for job in results[0]:
                assert job.seq.cached_tokens is not None and job.seq.cached_tokens < len(job.seq.prompt)
                cached += job.seq.cached_tokens
            for k, i in enumerate(talking):  # the answer joins the conversation, as a chat template resends it
                histories[i] += results[0][order.index(len(batch) - len(talking) + k)].seq.output
    finally:
        for server in servers:
            server.stop()
