"""`dlm.scheduler` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the
bounds a scheduler is built with, its refusals word for word, how a request leaves (its outcome, a cancellation and
a consumer that cannot tell), and a failed pass that leaves the rest of its step to run."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from dlm.candidates import Candidates
from dlm.contract import Profile
from dlm.planner import PassLimits
from dlm.refine import GenerationParams, TokenSpec
from dlm.scheduler import Cancelled, Job, QueueFull, Scheduler, ShuttingDown, pass_tokens

SPEC = TokenSpec(mask_token_id=0, eos_token_ids=frozenset({1}), block_size=8, max_position_embeddings=4096)


class IdleRuntime:
    """A runtime that only records its allocation (no request is ever run on it)."""

    profile: Profile | None = None

    def __init__(self) -> None:
        self.allocated: tuple[Any, ...] = ()

    def allocate(self, slots: int, context: int, token_budget: int | None = None) -> None:
        self.allocated = (slots, context, token_budget)

    def claim(self, free: list[int], prompt: list[int] | None) -> tuple[int, int]:
        return free[-1], 0

    def retain(self, slot: int, tokens: Any) -> None:
        pass


@pytest.mark.parametrize("max_live, max_queue", [(0, 4), (2, -1)])
def test_bounds_below_one_slot_or_a_negative_queue_are_refused(max_live: int, max_queue: int) -> None:
    with pytest.raises(ValueError) as raised:
        Scheduler(IdleRuntime(), SPEC, max_live=max_live, max_queue=max_queue, context=64)  # type: ignore[arg-type]
    assert str(raised.value) == f"max_live must be >= 1 and max_queue >= 0, got {max_live} and {max_queue}"


def test_one_slot_and_no_queue_are_enough() -> None:
    runtime = IdleRuntime()
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=0, context=64)  # type: ignore[arg-type]
    try:
        assert runtime.allocated == (1, 64, None) and (scheduler.live, scheduler.waiting) == (0, 0)
    finally:
        scheduler.stop()
    assert not scheduler._thread.is_alive()  # stop joined the scheduler's thread


class ScriptedRuntime(IdleRuntime):
    """A runtime whose every prediction is `token` (one other candidate far behind); the forward calls numbered in
    `fail_on` (from 1) raise."""

    def __init__(self, token: int = 5, fail_on: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.token, self.fail_on, self.calls = token, fail_on, 0

    def forward(self, slots: Any, input_ids: Any, position_ids: Any, new_mask: Any, cache_lengths: Any, causal: Any,
                logit_positions: np.ndarray, draft: Any = None, token_bitmask: Any = None) -> Candidates:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("injected fault")
        b, n = logit_positions.shape
        tokens = np.stack([np.full((b, n), self.token), np.full((b, n), self.token + 1)], axis=-1).astype(np.int64)
        logits = np.zeros((b, n, 2), np.float32)
        logits[..., 0] = 10.0
        return Candidates(tokens, logits, np.full((b, n), np.logaddexp(10.0, 0.0), np.float32))

    def commit(self, slots: Any, starts: Any, counts: Any) -> None:
        pass


class Recorder:
    """A consumer that records its updates and errors; `cancelled` is what it answers when asked (an exception is
    raised)."""

    def __init__(self, cancelled: bool | Exception = False) -> None:
        self.answer = cancelled
        self.updates: list[list[int]] = []
        self.errors: list[Exception] = []
        self.failed: list[Job] = []  # the job each error came with
        self.done = threading.Event()

    def cancelled(self) -> bool:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def update(self, job: Job) -> bool:
        self.updates.append(list(job.seq.output))
        if job.finished:
            self.done.set()
        return False

    def fail(self, job: Job, error: Exception) -> None:
        self.errors.append(error)
        self.failed.append(job)
        self.done.set()


def finish(runtime: IdleRuntime, consumer: Recorder, params: GenerationParams = GenerationParams("ar", 3)) -> Job:
    scheduler = Scheduler(runtime, SPEC, max_live=2, max_queue=2, context=64)  # type: ignore[arg-type]
    try:
        job = scheduler.submit([2, 3, 4], params, consumer)
        assert consumer.done.wait(30), "the request never finished"
        return job
    finally:
        scheduler.stop()


def test_a_request_ending_on_an_end_token_leaves_as_eos_and_one_at_max_tokens_as_length() -> None:
    consumer = Recorder()
    job = finish(ScriptedRuntime(token=1), consumer)  # 1 is SPEC's end token
    assert (job.outcome, consumer.updates[-1], consumer.errors) == ("eos", [], [])
    consumer = Recorder()
    job = finish(ScriptedRuntime(token=5), consumer)
    assert (job.outcome, consumer.updates[-1], consumer.errors) == ("length", [5, 5, 5], [])


def test_a_cancelled_request_is_failed_with_cancelled_word_for_word() -> None:
    consumer = Recorder(cancelled=True)
    job = finish(ScriptedRuntime(), consumer)
    assert job.outcome == "cancelled" and consumer.updates == [] and consumer.failed == [job]
    assert [(type(e), str(e)) for e in consumer.errors] == [(Cancelled, "the request was cancelled")]


def test_a_consumer_that_cannot_tell_whether_it_was_cancelled_is_treated_as_gone() -> None:
    consumer = Recorder(cancelled=ConnectionError("the client went away"))
    job = finish(ScriptedRuntime(), consumer)
    assert job.outcome == "cancelled" and consumer.updates == []
    assert [(type(e), str(e)) for e in consumer.errors] == [(Cancelled, "the request was cancelled")]


class Events:
    """An observer that records the events in order: the name, and the job for an admission or the arguments for
    the others; `ended` is set at each request's end."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.ended = threading.Event()

    def __getattr__(self, event: str) -> Any:
        def record(*args: Any) -> None:
            self.log.append((event, args[0] if event == "admitted" else args))
            if event == "finished":
                self.ended.set()

        return record


def test_a_failed_pass_leaves_the_other_passes_of_its_step_to_run_before_a_new_admission() -> None:
    """Two live requests in passes of their own (a batch of one row); the first pass fails: the second runs in the
    same step, before the slot the failure freed takes the waiting third request."""
    runtime, events = ScriptedRuntime(fail_on=(1,)), Events()
    scheduler = Scheduler(runtime, SPEC, max_live=2, max_queue=2, context=64,  # type: ignore[arg-type]
                          observer=events, limits=PassLimits(1, 8, 64, 8, 8))
    consumers = [Recorder() for _ in range(3)]
    try:
        with scheduler._lock:  # all three submitted before the scheduler admits any: two live, one waiting
            jobs = [scheduler.submit([2, 3, 4], GenerationParams("ar", 2), c) for c in consumers]
        for consumer in consumers:
            assert consumer.done.wait(30), "a request never finished"
    finally:
        scheduler.stop()
    assert sorted(str(e) for c in consumers for e in c.errors) == ["the engine pass failed: injected fault"]
    assert sorted(job.outcome or "" for job in jobs) == ["error", "length", "length"]
    names = [name for name, _ in events.log]
    third = names.index("admitted", names.index("finished"))  # the first admission after the failure
    assert events.log[third][1] is jobs[2] and "step" in names[names.index("finished"):third]


class Gone(Recorder):
    """A consumer whose client has gone: every update raises."""

    def update(self, job: Job) -> bool:
        self.updates.append(list(job.seq.output))
        raise ConnectionError("the client went away")


def test_a_consumer_that_cannot_be_told_has_gone_and_is_told_nothing_more() -> None:
    consumer, events = Gone(), Events()
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2, context=64,  # type: ignore[arg-type]
                          observer=events)
    try:
        job = scheduler.submit([2, 3, 4], GenerationParams("ar", 3), consumer)
        assert events.ended.wait(30), "the request never finished"
    finally:
        scheduler.stop()
    # its first token's update failed: cancelled there, with no last update and no error sent
    assert (job.outcome, consumer.updates, consumer.errors) == ("cancelled", [[5]], [])


def test_no_plans_are_no_tokens() -> None:
    assert pass_tokens([]) == (0, 0)


def test_the_occupancy_is_reported_at_each_arrival_admission_and_end() -> None:
    """One slot, two requests: (live, waiting) as each arrives, as the first is admitted (the second waits), as it
    ends, as the second is admitted and as it ends."""
    events = Events()
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=1, max_queue=2, context=64,  # type: ignore[arg-type]
                          observer=events)
    consumers = [Recorder(), Recorder()]
    try:
        with scheduler._lock:  # both submitted before the scheduler admits either
            for consumer in consumers:
                scheduler.submit([2, 3, 4], GenerationParams("ar", 2), consumer)
        for consumer in consumers:
            assert consumer.done.wait(30), "a request never finished"
    finally:
        scheduler.stop()
    occupancy = [args for name, args in events.log if name == "occupancy"]
    assert occupancy == [(0, 1), (0, 2), (1, 1), (0, 1), (1, 0), (0, 0)]


class Blocking(ScriptedRuntime):
    """A ScriptedRuntime whose passes wait until `release` is set; `entered` is set when the first one starts."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, *args: Any, **kwargs: Any) -> Candidates:
        self.entered.set()
        self.release.wait(30)
        return super().forward(*args, **kwargs)


def test_stopping_ends_the_waiting_requests_as_well_as_the_running_one() -> None:
    """A pass that does not return in time: stop ends the request in it and the one waiting for its slot, each
    with ShuttingDown, and none is left running or waiting."""
    runtime = Blocking()
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=2, context=64)  # type: ignore[arg-type]
    consumers = [Recorder(), Recorder()]
    jobs = [scheduler.submit([2, 3, 4], GenerationParams("ar", 3), consumer) for consumer in consumers]
    try:
        assert runtime.entered.wait(30), "the first request's pass never started"
        started = time.monotonic()
        scheduler.stop(timeout=0.2)
        assert time.monotonic() - started < 10  # it did not wait for the stuck pass (that takes 30 s)
        assert (scheduler.live, scheduler.waiting) == (0, 0)
        for job, consumer in zip(jobs, consumers):
            assert job.outcome == "error" and consumer.failed == [job]
            assert [str(e) for e in consumer.errors] == ["the server shut down before this request finished"]
    finally:
        runtime.release.set()
        scheduler._thread.join(30)


class GoneAtTheEnd(Recorder):
    """A consumer whose client leaves before the last response: the update of a finished job raises."""

    def update(self, job: Job) -> bool:
        if job.finished:
            raise ConnectionError("the client went away")
        return super().update(job)


def test_a_last_response_that_cannot_be_sent_is_logged_and_the_request_still_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer, events = GoneAtTheEnd(), Events()
    with caplog.at_level(logging.DEBUG, logger="dlm.scheduler"):
        scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2,  # type: ignore[arg-type]
                              context=64, observer=events)
        try:
            job = scheduler.submit([2, 3, 4], GenerationParams("ar", 3), consumer)
            assert events.ended.wait(30), "the request never finished"
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            scheduler.stop()
    assert job.outcome == "length" and consumer.errors == []
    assert [r.getMessage() for r in caplog.records if r.name == "dlm.scheduler"] == [
        "the last response of a length request could not be sent: the client went away"]


class Failing:
    """An observer whose every event raises."""

    def __getattr__(self, event: str) -> Any:
        def fail(*args: Any) -> None:
            raise RuntimeError("boom")

        return fail


def test_an_observer_that_fails_is_reported_once_and_decoding_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Recorder()
    with caplog.at_level(logging.DEBUG, logger="dlm.scheduler"):
        scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2,  # type: ignore[arg-type]
                              context=64, observer=Failing())
        try:
            # submitted before the scheduler's thread can observe anything: the first failure is the submission's
            # (the flag is not locked: two threads failing at once could each say it)
            with scheduler._lock:
                job = scheduler.submit([2, 3, 4], GenerationParams("ar", 3), consumer)
            assert consumer.done.wait(30), "the request never finished"
        finally:
            scheduler.stop()
    assert job.outcome == "length" and consumer.updates[-1] == [5, 5, 5] and consumer.errors == []
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "dlm.scheduler"] == [
        ("WARNING", "the scheduler's observer failed (occupancy: boom); decoding goes on")]


PROMPT = [2, 3, 4]


def test_the_context_refusals_name_the_largest_max_tokens_or_ask_for_a_shorter_prompt() -> None:
    """context 64, blocks of 8: a 3-token prompt may ask for 53 tokens, not 54; a 55-token prompt for 1 token; a
    56-token prompt for none."""
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2, context=64)  # type: ignore[arg-type]
    suffix = " (the limit is config.pbtxt's context, at most the artifact's --max-context)"
    try:
        scheduler.submit(PROMPT, GenerationParams("ar", 53), Recorder())  # exactly the context: accepted
        for prompt, max_tokens, advice in [
            (PROMPT, 54, "; max_tokens must be at most 53 for this prompt"),
            ([2] * 55, 2, "; max_tokens must be at most 1 for this prompt"),
            ([2] * 56, 1, "; shorten the prompt"),
        ]:
            with pytest.raises(ValueError) as raised:
                scheduler.submit(prompt, GenerationParams("ar", max_tokens), Recorder())
            assert str(raised.value) == (
                f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) + one block exceeds the 64 positions "
                f"a request may use here" + advice + suffix)
    finally:
        scheduler.stop()


def test_a_block_longer_than_a_pass_may_predict_is_refused_word_for_word() -> None:
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2, context=64,  # type: ignore[arg-type]
                          limits=PassLimits(2, 8, 64, 8, 16))
    try:
        with pytest.raises(ValueError) as raised:
            scheduler.submit(PROMPT, GenerationParams("diffusion", 16, block_length=16), Recorder())
        assert str(raised.value) == ("block_length 16 exceeds the 8 positions one pass of this artifact may predict; "
                                     "rebuild it with a larger --max-block")
    finally:
        scheduler.stop()


class WithDraftAdapter(IdleRuntime):
    has_draft_adapter = True


def test_a_speculative_request_looks_ahead_where_the_runtime_has_a_draft_adapter() -> None:
    scheduler = Scheduler(WithDraftAdapter(), SPEC, max_live=2, max_queue=2, context=64)  # type: ignore[arg-type]
    try:
        with scheduler._lock:  # looked at before the scheduler's thread runs it (this runtime cannot)
            job = scheduler.submit(PROMPT, GenerationParams("speculative", 8), Recorder())
            assert job.seq.lookahead is True
            job = scheduler.submit(PROMPT, GenerationParams("speculative", 8, draft_adapter=False), Recorder())
            assert job.seq.lookahead is False
    finally:
        scheduler.stop()


def test_after_stop_a_request_is_refused_word_for_word() -> None:
    scheduler = Scheduler(IdleRuntime(), SPEC, max_live=1, max_queue=1, context=64)  # type: ignore[arg-type]
    scheduler.stop()
    with pytest.raises(ShuttingDown) as raised:
        scheduler.submit(PROMPT, GenerationParams("ar", 3), Recorder())
    assert str(raised.value) == "the server is shutting down and accepts no new requests"


def test_a_request_refused_for_a_full_queue_is_observed_with_its_parameters() -> None:
    runtime, events = Blocking(), Events()
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=0, context=64,  # type: ignore[arg-type]
                          observer=events)
    first, refused = GenerationParams("ar", 3), GenerationParams("ar", 4)
    try:
        scheduler.submit(PROMPT, first, Recorder())
        assert runtime.entered.wait(30), "the first request's pass never started"
        with pytest.raises(QueueFull) as raised:
            scheduler.submit(PROMPT, refused, Recorder())
        assert str(raised.value) == "the queue is full (0 requests waiting, 1 running); retry later"
        rejected = [args for name, args in events.log if name == "rejected"]
        assert len(rejected) == 1 and rejected[0][0] is refused and len(rejected[0]) == 1
    finally:
        runtime.release.set()
        scheduler.stop()


def test_stop_with_a_drain_lets_the_running_request_finish() -> None:
    """A pass that returns 0.3 s into a drain of 10 s: the request finishes as it would have, with no error."""
    runtime, consumer = Blocking(), Recorder()
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=1, context=64)  # type: ignore[arg-type]
    job = scheduler.submit(PROMPT, GenerationParams("ar", 3), consumer)
    assert runtime.entered.wait(30), "the request's pass never started"
    release = threading.Timer(0.3, runtime.release.set)
    release.start()
    try:
        scheduler.stop(drain=10)
    finally:
        release.join()
    assert (job.outcome, consumer.updates[-1], consumer.errors) == ("length", [5, 5, 5], [])


class Claims(ScriptedRuntime):
    """A ScriptedRuntime that records the prompt each claim offers for a prefix match."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[list[int] | None] = []

    def claim(self, free: list[int], prompt: list[int] | None) -> tuple[int, int]:
        self.offered.append(None if prompt is None else list(prompt))
        return super().claim(free, prompt)


@pytest.mark.parametrize("prefix_caching", [None, True, False])
def test_a_claim_offers_the_prompt_for_a_prefix_match_only_with_prefix_caching(prefix_caching: bool | None) -> None:
    """None: the default, which is on."""
    runtime, consumer = Claims(), Recorder()
    chosen = {} if prefix_caching is None else {"prefix_caching": prefix_caching}
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=1, context=64, **chosen)  # type: ignore[arg-type]
    try:
        scheduler.submit(PROMPT, GenerationParams("ar", 2), consumer)
        assert consumer.done.wait(30), "the request never finished"
    finally:
        scheduler.stop()
    assert runtime.offered == [PROMPT if prefix_caching in (None, True) else None]


def test_a_failure_outside_the_engine_pass_ends_the_live_requests_and_the_scheduler_goes_on() -> None:
    """Passes of at most 16 positions behind a context of 64 (a misconfiguration the planner refuses when a step
    needs more): both live requests end with the scheduler's error once their caches are full; the next request,
    which fits, is served."""
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=2, max_queue=2, context=64,  # type: ignore[arg-type]
                          limits=PassLimits(2, 8, 16, 8, 16))
    consumers = [Recorder(), Recorder()]
    try:
        with scheduler._lock:
            jobs = [scheduler.submit(PROMPT, GenerationParams("ar", 30), c) for c in consumers]
        for consumer in consumers:
            assert consumer.done.wait(30), "a request never finished"
        for job, consumer in zip(jobs, consumers):
            assert job.outcome == "error" and consumer.failed == [job] and len(consumer.errors) == 1
            assert type(consumer.errors[0]) is RuntimeError
            message = str(consumer.errors[0])
            assert message.startswith("the scheduler failed: ") and "cannot run in any pass of" in message, message
        last = Recorder()
        job = scheduler.submit(PROMPT, GenerationParams("ar", 2), last)
        assert last.done.wait(30), "the scheduler stopped serving"
        assert (job.outcome, last.updates[-1], last.errors) == ("length", [5, 5], [])
    finally:
        scheduler.stop()


class Profiled(IdleRuntime):
    """A runtime built with an artifact profile: passes of up to 4 rows and 24 new tokens, blocks of up to 16."""

    profile = Profile.from_limits(block_size=8, max_batch=4, max_context=64, max_tokens=24, max_block=16)


def test_the_pass_limits_come_from_the_runtimes_profile_unless_given() -> None:
    runtime = Profiled()
    scheduler = Scheduler(runtime, SPEC, max_live=2, max_queue=2, context=64)  # type: ignore[arg-type]
    scheduler.stop()
    assert scheduler.limits == PassLimits.from_profile(Profiled.profile) == PassLimits(4, 24, 64, 16, 24)
    assert runtime.allocated == (2, 64, 24)  # the budget: one longest prefill
    given = PassLimits(2, 8, 64, 8, 16)
    scheduler = Scheduler(runtime, SPEC, max_live=3, max_queue=2, context=48, limits=given)  # type: ignore[arg-type]
    scheduler.stop()
    assert scheduler.limits is given and runtime.allocated == (3, 48, 16)


class Bare:
    """A runtime with no `profile` attribute at all (a plain module)."""

    def allocate(self, slots: int, context: int, token_budget: int | None = None) -> None:
        pass


def test_a_runtime_without_a_profile_runs_without_pass_limits() -> None:
    scheduler = Scheduler(Bare(), SPEC, max_live=1, max_queue=1, context=64)  # type: ignore[arg-type]
    scheduler.stop()
    assert scheduler.limits is None


class Padded(ScriptedRuntime):
    """A ScriptedRuntime that records each pass's input_ids."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[np.ndarray] = []

    def forward(self, slots: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Candidates:
        self.inputs.append(np.array(input_ids))
        return super().forward(slots, input_ids, *args, **kwargs)


@pytest.mark.parametrize("pad_token_id", [None, 7])
def test_a_shared_pass_pads_its_shorter_rows_with_the_pad_token(pad_token_id: int | None) -> None:
    """None: the default, 0. Two prompts of 3 and 5 tokens prefilled in one pass: the shorter row's last two."""
    runtime = Padded()
    chosen = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    scheduler = Scheduler(runtime, SPEC, max_live=2, max_queue=2, context=64, **chosen)  # type: ignore[arg-type]
    consumers = [Recorder(), Recorder()]
    try:
        with scheduler._lock:  # both admitted together
            for prompt, consumer in zip([PROMPT, [2, 3, 4, 5, 6]], consumers):
                scheduler.submit(prompt, GenerationParams("ar", 1), consumer)
        for consumer in consumers:
            assert consumer.done.wait(30), "a request never finished"
    finally:
        scheduler.stop()
    assert runtime.inputs[0].tolist() == [[2, 3, 4] + [pad_token_id or 0] * 2, [2, 3, 4, 5, 6]]


def test_the_kv_positions_are_reported_when_they_change_only() -> None:
    """A request cancelled before its first pass never moves them: nothing is reported. One that runs reports its
    cache as it grows, then 0 as it leaves."""
    events = Events()
    scheduler = Scheduler(ScriptedRuntime(), SPEC, max_live=1, max_queue=1, context=64,  # type: ignore[arg-type]
                          observer=events)
    try:
        cancelled = Recorder(cancelled=True)
        scheduler.submit(PROMPT, GenerationParams("ar", 3), cancelled)
        assert cancelled.done.wait(30), "the cancelled request never ended"
        assert [args for name, args in events.log if name == "kv_positions"] == []
        consumer = Recorder()
        scheduler.submit(PROMPT, GenerationParams("ar", 3), consumer)
        assert consumer.done.wait(30), "the request never finished"
    finally:
        scheduler.stop()
    reported = [args[0] for name, args in events.log if name == "kv_positions"]
    assert reported[-1] == 0 and reported[0] >= len(PROMPT)
    assert all(a != b for a, b in zip(reported, reported[1:]))


def test_the_scheduler_runs_in_a_named_daemon_thread_that_never_keeps_a_process_alive() -> None:
    """A process that never stops its scheduler (a Python backend killed mid-way, a script) still exits."""
    scheduler = Scheduler(IdleRuntime(), SPEC, max_live=1, max_queue=1, context=64)  # type: ignore[arg-type]
    try:
        assert "dlm-scheduler" in [thread.name for thread in threading.enumerate()]  # as thread dumps show it
    finally:
        scheduler.stop()
    script = ("import sys; sys.path[:0] = sys.argv[1:]\n"
              "from tests.test_scheduler_mutants import IdleRuntime, SPEC\n"
              "from dlm.scheduler import Scheduler\n"
              "scheduler = Scheduler(IdleRuntime(), SPEC, max_live=1, max_queue=1, context=64)\n"
              "print('started', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script, *sys.path], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "started\n"), done.stderr
