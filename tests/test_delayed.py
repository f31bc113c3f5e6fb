"""DelayedCalls, which holds back the last response of a cancelled request: calls run after the delay and in order,
a failing call does not stop the rest, and close() runs what is left at once, also what is scheduled after it."""

from __future__ import annotations

import functools
import threading
import time

from dlm.delayed import DelayedCalls


def test_calls_run_after_the_delay_in_order():
    calls = DelayedCalls(0.2)
    ran: list[tuple[int, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def record(i: int) -> None:
        ran.append((i, time.monotonic() - start))

    for i in range(3):
        calls.call_later(functools.partial(record, i))
    calls.call_later(done.set)
    assert not ran  # nothing before the delay
    assert done.wait(5)
    assert [i for i, _ in ran] == [0, 1, 2]
    assert all(seconds >= 0.2 for _, seconds in ran)
    calls.close()


def test_a_failing_call_does_not_stop_the_others():
    calls = DelayedCalls(0.0)
    done = threading.Event()

    def fail() -> None:
        raise RuntimeError("this call fails")

    calls.call_later(fail)
    calls.call_later(done.set)
    assert done.wait(5)
    calls.close()


def test_close_runs_what_is_left_at_once_and_later_calls_run_immediately():
    calls = DelayedCalls(60.0)
    ran: list[str] = []
    calls.call_later(lambda: ran.append("scheduled"))
    start = time.monotonic()
    calls.close()
    assert ran == ["scheduled"] and time.monotonic() - start < 5
    calls.call_later(lambda: ran.append("after close"))
    assert ran == ["scheduled", "after close"]
