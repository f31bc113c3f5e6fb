"""The scheduler's observer events (what Triton's metrics are made of), in-process on a random tiny model: every
engine pass reported with exactly the real and padding tokens the runtime was given, each request's admission and
first committed block once and in order, queue waits that cover the time a request really waited, and the KV-cache
positions in use back to 0 when the server is idle."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from dlm.planner import MAX_PADDING, PassLimits
from dlm.refine import GenerationParams, Pass, TokenSpec
from dlm.runtime import CacheLayout, TorchRuntime
from dlm.scheduler import Job, Scheduler, pass_tokens

from test_scheduler import PARAMS, PROMPTS  # the same requests as the scheduler's own tests


class Consumer:
    def __init__(self) -> None:
        self.first_update: float | None = None
        self.errors: list[Exception] = []
        self.done = threading.Event()

    def cancelled(self) -> bool:
        return False

    def update(self, job: Job) -> bool:
        if self.first_update is None and job.seq.tokens:
            self.first_update = time.perf_counter()
        if job.finished:
            self.done.set()
        return False

    def fail(self, job: Job, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()


class Events:
    """An observer that records every event with the time it came."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.lock = threading.Lock()

    def _add(self, *event: object) -> None:
        with self.lock:
            self.log.append((time.perf_counter(), *event))

    def of(self, kind: str) -> list[tuple]:
        with self.lock:
            return [e[2:] for e in self.log if e[1] == kind]

    def step(self, seconds: float, rows: int, real_tokens: int, padding_tokens: int) -> None:
        self._add("step", seconds, rows, real_tokens, padding_tokens)

    def admitted(self, job: Job) -> None:
        self._add("admitted", job)

    def first_block(self, job: Job) -> None:
        self._add("first_block", job)

    def kv_positions(self, positions: int) -> None:
        self._add("kv", positions)

    def occupancy(self, live: int, waiting: int) -> None:
        self._add("occupancy", live, waiting)

    def finished(self, job: Job) -> None:
        self._add("finished", job, time.perf_counter())

    def rejected(self, params: GenerationParams) -> None:
        self._add("rejected", params)


class Counting:
    """The wrapped runtime, recording each pass's B x T and its real (unmasked) new tokens."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.passes: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def forward(self, slots, input_ids, position_ids, new_mask, *args):
        self.passes.append((int(new_mask.sum()), int(input_ids.size - new_mask.sum())))
        return self.runtime.forward(slots, input_ids, position_ids, new_mask, *args)


@pytest.fixture
def spec(tiny_config_dict):
    return dataclasses.replace(TokenSpec.from_config(tiny_config_dict), eos_token_ids=frozenset())


@pytest.fixture
def runtime(tiny_model, tiny_config_dict):
    return Counting(TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict)))


def run(scheduler: Scheduler, prompts, params, gap: float = 0.0) -> list[tuple[Job, Consumer]]:
    jobs = []
    for prompt, p in zip(prompts, params):
        consumer = Consumer()
        jobs.append((scheduler.submit(prompt, p, consumer), consumer))
        time.sleep(gap)
    for _, consumer in jobs:
        assert consumer.done.wait(60), "a request never finished"
        assert not consumer.errors
    return jobs


def settle(events: Events, scheduler: Scheduler) -> None:
    """Wait for the scheduler thread's last events after the final responses."""
    deadline = time.monotonic() + 10
    while (scheduler.live or not events.of("kv") or events.of("kv")[-1] != (0,)) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_pass_tokens_counts_each_row_to_the_longest():
    def plan(n: int) -> Pass:
        return Pass(np.zeros(n, np.int64), np.arange(n), False, np.zeros(1, np.int64), np.zeros(1, np.int64))

    verifying = plan(8)
    verifying.extra = [plan(8), plan(8)]
    assert pass_tokens([plan(1)]) == (1, 0)
    assert pass_tokens([plan(8), plan(1), plan(5)]) == (14, 10)
    assert pass_tokens([verifying, plan(2)]) == (26, 6)  # 4 rows of 8


def test_every_pass_is_reported_with_the_tokens_the_runtime_ran(runtime, spec):
    events = Events()
    scheduler = Scheduler(runtime, spec, max_live=3, max_queue=10, context=64, observer=events)
    run(scheduler, PROMPTS, PARAMS, gap=0.005)  # 5 requests, 3 slots, mixed modes: one padded pass per step
    settle(events, scheduler)
    scheduler.stop()
    steps = events.of("step")
    assert [(real, padding) for _, _, real, padding in steps] == runtime.passes
    assert sum(padding for *_, padding in steps) > 0  # one pass for every live row of every size pads
    assert all(seconds > 0 and rows >= 1 for seconds, rows, *_ in steps)
    # every prompt token ran once, as a real token of a prefill
    assert sum(real for _, _, real, _ in steps) >= sum(len(p) for p in PROMPTS)


def test_admission_and_first_block_once_per_request_in_order(runtime, spec):
    events = Events()
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=10, context=64, observer=events)
    jobs = run(scheduler, PROMPTS[:3], PARAMS[:3])  # one slot: the second and third wait for the one before
    settle(events, scheduler)
    scheduler.stop()
    admitted = [job for (job,) in events.of("admitted")]
    first = [job for (job,) in events.of("first_block")]
    finished = {id(job): at for job, at in events.of("finished")}
    assert admitted == first == [job for job, _ in jobs]  # FIFO, each once
    for (job, consumer), before in zip(jobs, [None, *[j for j, _ in jobs[:-1]]]):
        assert job.admitted_at is not None and job.first_block_at is not None and consumer.first_update is not None
        assert job.submitted <= job.admitted_at <= job.first_block_at <= consumer.first_update
        if before is not None:  # it waited for the request before it to leave its slot
            assert job.admitted_at >= finished[id(before)]
            assert job.admitted_at - job.submitted > 0
        # its first block comes after its prefill pass, which took at least as long as the shortest pass
        assert job.first_block_at - job.admitted_at >= min(s for s, *_ in events.of("step"))


def test_no_first_block_for_a_request_cancelled_before_its_first_token(runtime, spec):
    class Gone(Consumer):
        def cancelled(self) -> bool:
            return True

    events = Events()
    scheduler = Scheduler(runtime, spec, max_live=1, max_queue=2, context=64, observer=events)
    gone = Gone()
    job = scheduler.submit(PROMPTS[0], PARAMS[0], gone)
    run(scheduler, PROMPTS[1:2], PARAMS[1:2])
    settle(events, scheduler)
    scheduler.stop()
    assert job.outcome == "cancelled" and job.first_block_at is None
    assert [j for (j,) in events.of("admitted")][0] is job
    assert job not in [j for (j,) in events.of("first_block")]


def test_kv_positions_follow_the_live_caches_and_return_to_zero(runtime, spec):
    events = Events()
    scheduler = Scheduler(runtime, spec, max_live=3, max_queue=10, context=64, observer=events)
    long_prompt = PROMPTS[2]
    jobs = run(scheduler, PROMPTS[:3], PARAMS[:3])
    settle(events, scheduler)
    scheduler.stop()
    seen = [positions for (positions,) in events.of("kv")]
    assert seen[-1] == 0 and max(seen) >= len(long_prompt)
    assert all(a != b for a, b in zip(seen, seen[1:]))  # told only when it changed
    assert max(seen) <= sum(len(job.seq.prompt) + len(job.seq.tokens) + job.seq.block_length for job, _ in jobs)


def test_chunked_prefill_under_the_planner_reports_its_chunks_and_bounded_padding(runtime, spec):
    events = Events()
    limits = PassLimits(max_batch=4, max_tokens=64, max_context=64, max_block=8, token_budget=16)
    scheduler = Scheduler(runtime, spec, max_live=3, max_queue=10, context=64, observer=events, limits=limits)
    long_prompt = [1] + list(range(10, 50))  # 41 tokens: prefilled in chunks of 16
    params = [GenerationParams("diffusion", max_tokens=8, block_length=8), *PARAMS[:2]]
    run(scheduler, [long_prompt, *PROMPTS[:2]], params)
    settle(events, scheduler)
    scheduler.stop()
    steps = events.of("step")
    assert [(real, padding) for _, _, real, padding in steps] == runtime.passes
    assert all(real + padding <= limits.token_budget for _, _, real, padding in steps)
    assert all(padding <= MAX_PADDING * (real + padding) for _, _, real, padding in steps)
    assert any(rows == 1 and real == 16 and padding == 0 for _, rows, real, padding in steps)  # a full chunk
