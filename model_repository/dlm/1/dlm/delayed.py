"""Calls run a fixed delay after they are scheduled, in order, on one thread of their own; `close()` runs what is
left at once. The Triton model uses it to hold back the last response of a cancelled request (see model.py)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DelayedCalls:
    def __init__(self, delay: float, name: str = "dlm-delayed"):
        self.delay = delay
        self._calls: queue.SimpleQueue[tuple[float, Callable[[], None]] | None] = queue.SimpleQueue()
        self._hurry = threading.Event()  # set by close(): what is left runs without waiting
        self._lock = threading.Lock()  # no call is queued behind close()'s end marker
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, function: Callable[[], None]) -> None:
        """Run `function` `delay` seconds from now (at once after close())."""
        with self._lock:
            if not self._hurry.is_set():
                self._calls.put((time.monotonic() + self.delay, function))
                return
        self._call(function)

    def close(self, timeout: float = 10.0) -> None:
        """Run every scheduled call now and stop the thread."""
        with self._lock:
            self._hurry.set()
            self._calls.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # one fixed delay: calls fall due in the order they were scheduled
        while (item := self._calls.get()) is not None:
            due, function = item
            self._hurry.wait(max(0.0, due - time.monotonic()))
            self._call(function)

    @staticmethod
    def _call(function: Callable[[], None]) -> None:
        try:
            function()
        except Exception:  # noqa: BLE001 - one failing call must not stop the others
            log.exception("a delayed call failed")
