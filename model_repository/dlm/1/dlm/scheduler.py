"""Step-level continuous batching: one background thread runs one engine pass at a time over every live request.

A request waits in a bounded FIFO queue until a KV-cache slot is free; it joins the live batch at the next step,
whatever its mode and parameters, and leaves it (freeing its slot) in the step it finishes, is cancelled, or is
stopped by its consumer. The runtime's cache is allocated once, at start, for `max_live` slots of `context`
positions. Each step plans its passes (`refine.plan_step`: the pass planner groups the live rows into passes that
fit the artifact's profile and the per-pass token budget, prefilling long prompts in chunks), runs them with
`refine.step` (the same loop `refine.generate` runs offline), then tells each request's consumer what was
committed. A pass that raises fails only the requests that took part in it.

Prefix caching (`prefix_caching`, on by default): a request that leaves, unless it failed, leaves its slot's keys
and values resident, and a new request takes over the free slot that shares the longest prefix with its prompt
(`ServingRuntime.claim`, `dlm.kv_cache`), its prefill starting after the shared part.

An `Observer` (Triton's metrics) is told of every pass (its time, requests and tokens, padding included), of each
request's admission and first committed block, and of the KV-cache positions in use. It is called on the scheduler
thread, so it must be quick (model.py's `Metrics` queues its updates for a thread of its own); a failing one is
ignored.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from dlm.planner import PassLimits
from dlm.refine import GenerationParams, Pass, Sequence, TokenSpec, look_ahead_for, plan_step, step
from dlm.runtime import ServingRuntime

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the request was not accepted."""


class Cancelled(RuntimeError):
    """The client cancelled the request or went away."""


class ShuttingDown(RuntimeError):
    """The scheduler is stopping; the request was not (or will not be) finished."""


class Consumer(Protocol):
    """Receives one request's progress, on the scheduler thread."""

    def cancelled(self) -> bool:
        """True once the client has gone or cancelled: the request stops costing passes at the next step."""
        ...

    def update(self, job: "Job") -> bool:
        """Called after every pass that committed tokens for the job, and once when it finishes
        (`job.finished`). Return True to end the request now (a stop word was generated)."""
        ...

    def fail(self, job: "Job", error: Exception) -> None:
        """The request ends without a result: a failed pass, or the scheduler stopping."""
        ...


class Observer(Protocol):
    """Receives the scheduler's measurements (Triton's metrics), from the scheduler thread and request threads."""

    def step(self, seconds: float, rows: int, real_tokens: int, padding_tokens: int) -> None:
        """One engine pass: its wall time, the requests in it, and its B x T tokens as `refine.step` pads them:
        those of the rows' plans (`real_tokens`) and the padding (`padding_tokens`); see `pass_tokens`."""
        ...

    def admitted(self, job: "Job") -> None:
        """The request took a KV-cache slot (`job.admitted_at`; its queue wait is `admitted_at - submitted`; with
        prefix caching, `job.seq.cached_tokens` of its prompt were in that slot already)."""
        ...

    def first_block(self, job: "Job") -> None:
        """The request's first tokens were committed (`job.first_block_at`), just before its consumer is told:
        a streaming client's first response. Once per request; never for one that ends without a token."""
        ...

    def kv_positions(self, positions: int) -> None:
        """The KV-cache positions the live requests hold (the sum of their cache lengths), after each step in
        which it changed."""
        ...

    def occupancy(self, live: int, waiting: int) -> None:
        """Called whenever a request is queued, joins the batch or leaves it."""
        ...

    def finished(self, job: "Job") -> None: ...

    def rejected(self, params: GenerationParams) -> None: ...


@dataclass
class Job:
    seq: Sequence
    consumer: Consumer
    submitted: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # perf_counter time it took a slot
    first_block_at: float | None = None  # perf_counter time its first tokens were committed
    reported: int = 0  # committed tokens the consumer has seen
    outcome: str | None = None  # "eos", "length", "stop", "cancelled" or "error" once finished

    @property
    def finished(self) -> bool:
        return self.outcome is not None


def pass_tokens(plans: list[Pass]) -> tuple[int, int]:
    """The real and padding tokens of one pass over `plans` (their `extra` rows included), as `refine.step` pads
    it: every row to the longest row's tokens, B x T in all."""
    rows = [row for plan in plans for row in (plan, *plan.extra)]
    real = sum(len(row.tokens) for row in rows)
    return real, len(rows) * max((len(row.tokens) for row in rows), default=0) - real


class Scheduler:
    def __init__(
        self,
        runtime: ServingRuntime,
        spec: TokenSpec,
        max_live: int,
        max_queue: int,
        context: int,
        observer: Observer | None = None,
        pad_token_id: int = 0,
        limits: PassLimits | None = None,
        prefix_caching: bool = True,
    ):
        """`limits`: what one pass may hold; by default the runtime's artifact profile (when it has one) with a
        budget of one longest prefill. `prefix_caching`: reuse the keys and values finished requests left."""
        if max_live < 1 or max_queue < 0:
            raise ValueError(f"max_live must be >= 1 and max_queue >= 0, got {max_live} and {max_queue}")
        profile = getattr(runtime, "profile", None)
        self.limits = limits or (PassLimits.from_profile(profile) if profile is not None else None)
        self.runtime, self.spec, self.observer = runtime, spec, observer
        self.max_live, self.max_queue, self.context = max_live, max_queue, context
        self.pad_token_id = pad_token_id
        self.prefix_caching = prefix_caching
        runtime.allocate(max_live, context, self.limits.token_budget if self.limits else None)
        self._free_slots = list(range(max_live - 1, -1, -1))
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []
        self._lock = threading.Condition()
        self._stopping = False  # no new requests
        self._closed = False  # the thread ends
        self._observer_failed = False
        self._kv_positions = 0  # last told to the observer
        self._thread = threading.Thread(target=self._run, name="dlm-scheduler", daemon=True)
        self._thread.start()

    # --- called from request threads -------------------------------------------------------------------------
    def _sequence(self, prompt: list[int], params: GenerationParams) -> Sequence:
        """The request's decoding state; ValueError when it cannot run here: its parameters, its prompt, or a
        context beyond the cache."""
        seq = Sequence(list(prompt), params, self.spec)  # validates params and the prompt
        seq.lookahead = look_ahead_for(params, self.runtime)
        if seq.context_needed > self.context:
            room = self.context - len(prompt) - seq.block_length
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) + one block exceeds the "
                f"{self.context} positions a request may use here"
                + (f"; max_tokens must be at most {room} for this prompt" if room >= 1 else "; shorten the prompt")
                + " (the limit is config.pbtxt's context, at most the artifact's --max-context)"
            )
        if self.limits is not None and seq.block_length > self.limits.max_block:
            raise ValueError(
                f"block_length {seq.block_length} exceeds the {self.limits.max_block} positions one pass of this "
                f"artifact may predict; rebuild it with a larger --max-block"
            )
        return seq

    def submit(self, prompt: list[int], params: GenerationParams, consumer: Consumer) -> Job:
        """Queue a request; raises ValueError for a request that cannot run, QueueFull when the queue is full."""
        job = Job(self._sequence(prompt, params), consumer)
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue and not self._free_slots:
                self._observe("rejected", params)
                raise QueueFull(
                    f"the queue is full ({self.max_queue} requests waiting, {self.max_live} running); retry later"
                )
            self._waiting.append(job)
            self._lock.notify()
        self._occupancy()
        return job

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, drain: float = 0.0, timeout: float = 10.0) -> None:
        """Stop taking requests, give the running and waiting ones `drain` seconds to finish, end the rest with
        ShuttingDown, and join the thread."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain
        while (self._live or self._waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)
        with self._lock:  # the thread has gone (or is stuck in a pass): end whatever is left
            left = list(self._waiting) + list(self._live)
        for job in left:
            self._leave(job, "error", ShuttingDown("the server shut down before this request finished"))

    # --- the scheduler thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._live):
                    self._lock.wait()
                if self._closed:
                    return
                admitted = []
                while self._waiting and self._free_slots:
                    job = self._waiting.popleft()
                    slot, cached = self.runtime.claim(self._free_slots,
                                                      job.seq.prompt if self.prefix_caching else None)
                    self._free_slots.remove(slot)
                    job.seq.slot = slot
                    if self.prefix_caching:
                        job.seq.reuse(cached)
                    job.admitted_at = time.perf_counter()
                    self._live.append(job)
                    admitted.append(job)
            if admitted:
                self._occupancy()
                for job in admitted:
                    self._observe("admitted", job)
            try:
                self._drop_cancelled()
                if self._live:
                    self._step()
            except Exception as error:  # noqa: BLE001 - a bug must end the requests concerned, never the loop
                for job in list(self._live):
                    self._leave(job, "error", RuntimeError(f"the scheduler failed: {error}"))
            positions = sum(job.seq.cache_length for job in list(self._live))
            if positions != self._kv_positions:
                self._kv_positions = positions
                self._observe("kv_positions", positions)

    def _drop_cancelled(self) -> None:
        for job in list(self._live):
            if self._cancelled(job):
                self._leave(job, "cancelled", Cancelled("the request was cancelled"))

    def _cancelled(self, job: Job) -> bool:
        try:
            return job.consumer.cancelled()
        except Exception:  # a consumer that cannot tell is treated as gone
            return True

    def _step(self) -> None:
        jobs = {id(job.seq): job for job in self._live}
        for seqs, plans in plan_step([job.seq for job in jobs.values()], self.limits):
            group = [jobs[id(seq)] for seq in seqs]
            start = time.perf_counter()
            try:
                step(self.runtime, seqs, self.pad_token_id, plans)
            except Exception as error:  # noqa: BLE001 - one failed pass fails its requests, never the server
                for job in group:
                    self._leave(job, "error", RuntimeError(f"the engine pass failed: {error}"))
                continue
            end = time.perf_counter()
            for job in group:
                first = job.first_block_at is None and bool(job.seq.tokens)
                if first:
                    job.first_block_at = end
                    self._observe("first_block", job)
                if job.seq.done:
                    self._leave(job, job.seq.finish_reason or "length")
                elif len(job.seq.tokens) > job.reported:
                    self._report(job)
            self._observe("step", end - start, len(group), *pass_tokens(plans))

    def _report(self, job: Job) -> None:
        """Tell the consumer what was committed; it may stop the job, and one that cannot be told has gone."""
        try:
            stop = job.consumer.update(job)
        except Exception:
            self._leave(job, "cancelled")
            return
        job.reported = len(job.seq.tokens)
        if stop:
            self._leave(job, "stop")

    def _leave(self, job: Job, outcome: str, error: Exception | None = None) -> None:
        """End a job: free its slot at once, count it, then send its last word (the final update, or the error)."""
        with self._lock:
            if job in self._live:
                self._live.remove(job)
                # what a failed pass may have left half-written is never offered again
                keep = self.prefix_caching and outcome != "error"
                self.runtime.retain(job.seq.slot, job.seq.resident if keep else [])
                self._free_slots.append(job.seq.slot)
            elif job in self._waiting:
                self._waiting.remove(job)
        self._occupancy()
        job.outcome = outcome
        self._observe("finished", job)
        try:
            if error is not None:
                job.consumer.fail(job, error)
            elif outcome != "cancelled":
                job.consumer.update(job)
        except Exception as e:  # the client has gone: the request is over either way
            log.debug("the last response of a %s request could not be sent: %s", outcome, e)

    def _occupancy(self) -> None:
        self._observe("occupancy", len(self._live), len(self._waiting))

    def _observe(self, event: str, *args: object) -> None:
        """Measurements never stop decoding: an observer that fails is ignored."""
        if self.observer is not None:
            try:
                getattr(self.observer, event)(*args)
            except Exception as e:
                if not self._observer_failed:  # said once, not at every step
                    log.warning("the scheduler's observer failed (%s: %s); decoding goes on", event, e)
                    self._observer_failed = True
