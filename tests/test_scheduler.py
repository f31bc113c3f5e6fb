"""The continuous-batching scheduler in-process, on a random tiny model: requests that join and leave at any step
decode exactly as they do alone; cancellation, stop requests, a full queue and a failing pass each end only the
requests concerned and free their slots."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime
from dlm.scheduler import Cancelled, Job, QueueFull, Scheduler, ShuttingDown

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 40, 41], [1, 7, 7]]
PARAMS = [
    GenerationParams("ar", max_tokens=12),
    GenerationParams("diffusion", max_tokens=20, threshold=0.9),
    GenerationParams("speculative", max_tokens=17),
    GenerationParams("diffusion", max_tokens=9, threshold=None, steps=3),
    GenerationParams("ar", max_tokens=5, temperature=0.8, seed=7),
]


class Recorder:
    """A consumer that records what it is told; optionally cancels, stops or fails to send."""

    def __init__(self, cancel_after: int | None = None, stop_after: int | None = None):
        self.updates: list[list[int]] = []
        self.errors: list[Exception] = []
        self.done = threading.Event()
        self.cancel_after, self.stop_after = cancel_after, stop_after

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.updates) >= self.cancel_after

    def update(self, job: Job) -> bool:
        self.updates.append(list(job.seq.output))
        if job.finished:
            self.done.set()
        return self.stop_after is not None and len(self.updates) >= self.stop_after

    def fail(self, job: Job, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()


class FlakyRuntime:
    """A runtime whose `forward` raises on chosen calls; everything else is the wrapped runtime's."""

    def __init__(self, runtime, fail_on: set[int]):
        self.runtime, self.fail_on, self.calls = runtime, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def forward(self, *args):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("injected fault")
        return self.runtime.forward(*args)


@pytest.fixture
def spec(tiny_config_dict):
    return dataclasses.replace(TokenSpec.from_config(tiny_config_dict), eos_token_ids=frozenset())


@pytest.fixture
def runtime(tiny_model, tiny_config_dict):
    return TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict))


def alone(runtime_factory, spec, prompt, params):
    return generate(runtime_factory(), [prompt], params, spec)[0]


@pytest.fixture
def fresh_runtime(tiny_model, tiny_config_dict):
    return lambda: TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict))


def wait_all(recorders, timeout=60.0):
    for r in recorders:
        assert r.done.wait(timeout), "a request never finished"


def test_requests_joining_at_different_steps_decode_as_they_do_alone(runtime, fresh_runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=3, max_queue=10, context=64)
    recorders = []
    for prompt, params in zip(PROMPTS, PARAMS):  # 5 requests, 3 slots: some wait, all join mid-flight
        recorders.append(Recorder())
        scheduler.submit(prompt, params, recorders[-1])
        time.sleep(0.01)
    wait_all(recorders)
    for prompt, params, recorder in zip(PROMPTS, PARAMS, recorders):
        assert recorder.updates[-1] == alone(fresh_runtime, spec, prompt, params).tokens
        assert not recorder.errors
    assert scheduler.live == 0 and scheduler.waiting == 0
    scheduler.stop()


def test_updates_grow_by_committed_blocks(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=2, max_queue=2, context=64)
    recorder = Recorder()
    scheduler.submit(PROMPTS[0], GenerationParams("diffusion", max_tokens=20, threshold=None, steps=2), recorder)
    wait_all([recorder])
    lengths = [len(u) for u in recorder.updates]
    assert lengths == sorted(lengths) and lengths[-1] == 20
    assert len(lengths) >= 3  # the first seed, then each written block with the next seed
    scheduler.stop()


def test_cancelled_request_leaves_at_the_next_step_and_frees_its_slot(runtime, fresh_runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=2, context=64)
    cancelled, waiting = Recorder(cancel_after=2), Recorder()
    scheduler.submit(PROMPTS[0], GenerationParams("ar", max_tokens=40), cancelled)
    scheduler.submit(PROMPTS[1], PARAMS[0], waiting)  # needs the only slot
    wait_all([cancelled, waiting])
    assert len(cancelled.updates) == 2 and isinstance(cancelled.errors[0], Cancelled)
    assert waiting.updates[-1] == alone(fresh_runtime, spec, PROMPTS[1], PARAMS[0]).tokens
    assert scheduler.live == 0
    scheduler.stop()


def test_consumer_can_stop_a_request_early(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=1, context=64)
    recorder = Recorder(stop_after=3)
    job = scheduler.submit(PROMPTS[0], GenerationParams("ar", max_tokens=30), recorder)
    wait_all([recorder])
    assert job.outcome == "stop" and len(recorder.updates) == 4  # three updates, then the final one
    assert len(recorder.updates[-1]) == 3
    scheduler.stop()


def test_full_queue_is_refused_and_nothing_accepted_is_lost(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=2, context=64)
    gate = threading.Event()
    blocker = Recorder()

    def held_until_the_gate_opens() -> bool:  # keeps the scheduler thread in its cancellation check
        gate.wait(30)
        return False

    blocker.cancelled = held_until_the_gate_opens  # type: ignore[method-assign]
    scheduler.submit(PROMPTS[0], PARAMS[0], blocker)
    time.sleep(0.2)  # the blocker is live, the thread waits in its cancellation check
    accepted = [Recorder(), Recorder()]
    for r in accepted:
        scheduler.submit(PROMPTS[1], PARAMS[0], r)
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit(PROMPTS[1], PARAMS[0], Recorder())
    gate.set()
    wait_all([blocker, *accepted])
    assert all(r.updates and not r.errors for r in accepted)
    scheduler.stop()


def test_a_failing_pass_fails_only_its_requests(runtime, fresh_runtime, spec):
    flaky = FlakyRuntime(runtime, fail_on={3})
    scheduler = Scheduler(flaky, spec, max_live=4, max_queue=4, context=64)
    first = [Recorder(), Recorder()]
    for r, params in zip(first, PARAMS[:2]):
        scheduler.submit(PROMPTS[0], params, r)
    wait_all(first)
    assert all(isinstance(r.errors[0], RuntimeError) and "injected fault" in str(r.errors[0]) for r in first)
    after = Recorder()
    scheduler.submit(PROMPTS[2], PARAMS[2], after)
    wait_all([after])
    assert not after.errors and after.updates[-1] == alone(fresh_runtime, spec, PROMPTS[2], PARAMS[2]).tokens
    assert scheduler.live == 0
    scheduler.stop()


def test_stop_ends_waiting_and_live_requests_with_an_error(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=4, context=256)
    recorders = [Recorder(), Recorder()]
    for r in recorders:
        scheduler.submit(PROMPTS[0], GenerationParams("ar", max_tokens=200), r)
    scheduler.stop()
    wait_all(recorders, timeout=5)
    for r in recorders:  # neither can have finished: 200 ar passes outlast an immediate stop
        assert r.done.is_set() and r.errors and isinstance(r.errors[0], ShuttingDown), (r.updates, r.errors)
    with pytest.raises(ShuttingDown):
        scheduler.submit(PROMPTS[0], PARAMS[0], Recorder())


def test_request_beyond_the_context_is_refused_with_the_largest_max_tokens(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=1, context=32)
    with pytest.raises(ValueError, match=r"max_tokens must be at most 19 for this prompt"):
        scheduler.submit(PROMPTS[0], GenerationParams("ar", max_tokens=20), Recorder())  # 5 + 20 + 8 > 32
    with pytest.raises(ValueError, match="prompt is empty"):
        scheduler.submit([], PARAMS[0], Recorder())
    scheduler.stop()


def test_slots_are_allocated_once(runtime, spec):
    scheduler = Scheduler(runtime, spec, max_live=2, max_queue=4, context=64)
    cache = runtime.cache
    recorders = [Recorder() for _ in range(4)]
    for r, prompt in zip(recorders, PROMPTS):
        scheduler.submit(prompt, PARAMS[0], r)
    wait_all(recorders)
    assert runtime.cache is cache and runtime.slots == 2
    assert np.all([not r.errors for r in recorders])
    scheduler.stop()


def test_a_failing_observer_never_stops_decoding(runtime, fresh_runtime, spec):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("metrics are down")

    scheduler = Scheduler(runtime, spec, max_live=2, max_queue=2, context=64, observer=Broken())
    recorder = Recorder()
    scheduler.submit(PROMPTS[1], PARAMS[1], recorder)
    wait_all([recorder])
    assert recorder.updates[-1] == alone(fresh_runtime, spec, PROMPTS[1], PARAMS[1]).tokens
    scheduler.stop()
