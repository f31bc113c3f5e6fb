"""Graceful drain of the gateway on SIGTERM, so a replica leaves the router's pool without losing a request.

On the first SIGTERM (what Kubernetes sends a container it stops, after its preStop hook):

- `GET /health` answers 503 at once (`"draining": true`): the readiness probe fails, the pod turns unready, and the
  router (which also drops a pod as soon as it is being deleted) sends it nothing more;
- a new `/v1/completions` or `/v1/chat/completions` request is refused with 503 (`code: "draining"`,
  `Connection: close`), never half-served;
- the requests already running go on to their end, streams included;
- the process exits once none is left, or after `seconds` (`--drain-seconds`), whichever comes first. Keep the
  deadline at least Triton's `--exit-timeout-secs` (Triton lets its own running requests finish that long) and
  below the pod's `terminationGracePeriodSeconds` less its preStop sleep.

A second SIGTERM, or SIGINT, stops at once through uvicorn's own shutdown.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("client.drain")

# the endpoints that start work at Triton: refused while draining, and what the drain waits for
GENERATION = ("/v1/completions", "/v1/chat/completions")


class Drain:
    """Whether the gateway is draining, since when, and how many generation requests are still running."""

    def __init__(self, seconds: float = 30.0):
        self.seconds = seconds
        self.since: float | None = None  # time.monotonic() of the SIGTERM
        self.running = 0

    @property
    def draining(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("SIGTERM: draining, %d request(s) running; new requests are refused, exit within %.0f s",
                        self.running, self.seconds)

    def done(self) -> bool:
        """Draining and nothing left to wait for: no request running, or the deadline has passed."""
        if self.since is None:
            return False
        if self.running and time.monotonic() - self.since < self.seconds:
            return False
        if self.running:
            log.error("drain deadline (%.0f s) passed with %d request(s) still running", self.seconds, self.running)
        return True


class DrainGate:
    """ASGI middleware: counts the generation requests running and refuses new ones with 503 while draining."""

    def __init__(self, app: Any, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            body = json.dumps({"error": {
                "message": "this replica is shutting down and takes no new requests; send the request again (the "
                           "router picks another replica)",
                "type": "server_error", "param": None, "code": "draining"}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"retry-after", b"1"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.running -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above: the first SIGTERM drains, the exit follows when the drain is done."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining and not self.should_exit:
            self.drain.start()  # not recorded as uvicorn's captured signal: the exit is a normal one (status 0)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.done():
            self.should_exit = True
        return await super().on_tick(counter)
