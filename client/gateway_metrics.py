"""The gateway's own metrics in Prometheus' text exposition format (`GET /metrics`), written by hand: counters and
histograms of one process, updated from its event loop only.

| metric | type |
| --- | --- |
| `dlm_gateway_requests_total{endpoint,status}` | counter: HTTP requests answered, by status code |
| `dlm_gateway_errors_total{endpoint,status}` | counter: requests that ended in an error: an error status (not 499, a client that went away), or an error event after a stream's 200 (labelled with the status the error maps to) |
| `dlm_gateway_requests_in_flight` | gauge |
| `dlm_gateway_request_duration_seconds{endpoint}` | histogram: request received to the response's last byte |
| `dlm_gateway_time_to_first_token_seconds{endpoint}` | histogram: request received to a stream's first chunk with text |
| `dlm_gateway_prompt_tokens_total{endpoint}`, `dlm_gateway_completion_tokens_total{endpoint}` | counters, as `usage` reports them |
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# the paths counted under their own name; any other path is counted as "other", so labels stay bounded
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def endpoint_of(path: str) -> str:
    return path if path in ENDPOINTS else "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    rendered = ",".join(part for part in (rendered, extra) if part)
    return f"{{{rendered}}}" if rendered else ""


def _le(bound: str) -> str:
    return 'le="' + bound + '"'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: tuple[tuple[str, str], ...]) -> list[str]:
        bounds = [*(_number(b) for b in self.buckets), "+Inf"]
        out = [f"{name}_bucket{_labels(labels, _le(bound))} {count}"
               for bound, count in zip(bounds, [*self.counts, self.count])]
        out += [f"{name}_sum{_labels(labels)} {_number(self.sum)}", f"{name}_count{_labels(labels)} {self.count}"]
        return out


Labels = tuple[tuple[str, str], ...]


class GatewayMetrics:
    """What the gateway counts; `text()` renders it, followed by the text of each source added with `add_source`
    (none by default)."""

    def __init__(self) -> None:
        self.requests: dict[Labels, int] = defaultdict(int)
        self.errors: dict[Labels, int] = defaultdict(int)
        self.in_flight = 0
        self.duration: dict[Labels, Histogram] = {}
        self.first_token: dict[Labels, Histogram] = {}
        self.prompt_tokens: dict[Labels, int] = defaultdict(int)
        self.completion_tokens: dict[Labels, int] = defaultdict(int)
        self.sources: list[Callable[[], str]] = []

    def add_source(self, source: Callable[[], str]) -> None:
        self.sources.append(source)

    # --- recording ---
    def answered(self, path: str, status: int, seconds: float) -> None:
        endpoint = endpoint_of(path)
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1
        if status >= 400 and status != 499:  # 499: the client went away, its own choice
            self.error(path, status)
        self.duration.setdefault((("endpoint", endpoint),), Histogram()).observe(seconds)

    def error(self, path: str, status: int) -> None:
        self.errors[(("endpoint", endpoint_of(path)), ("status", str(status)))] += 1

    def first_text(self, path: str, seconds: float) -> None:
        self.first_token.setdefault((("endpoint", endpoint_of(path)),), Histogram()).observe(seconds)

    def tokens(self, path: str, prompt: int, completion: int) -> None:
        key = (("endpoint", endpoint_of(path)),)
        self.prompt_tokens[key] += prompt
        self.completion_tokens[key] += completion

    # --- exposition ---
    def text(self) -> str:
        lines: list[str] = []

        def counter(name: str, help_text: str, values: dict[Labels, int], kind: str = "counter") -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{_labels(labels)} {value}" for labels, value in sorted(values.items()))

        def histogram(name: str, help_text: str, values: dict[Labels, Histogram]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} histogram"])
            for labels, h in sorted(values.items()):
                lines.extend(h.lines(name, labels))

        counter("dlm_gateway_requests_total", "HTTP requests answered, by endpoint and status code", self.requests)
        counter("dlm_gateway_errors_total", "Requests that ended in an error (an error status, or an error event "
                "after a stream began), by endpoint and the status the error maps to", self.errors)
        counter("dlm_gateway_requests_in_flight", "Requests being answered", {(): self.in_flight}, kind="gauge")
        histogram("dlm_gateway_request_duration_seconds", "From a request's arrival to its response's last byte",
                  self.duration)
        histogram("dlm_gateway_time_to_first_token_seconds", "From a streamed request's arrival to its first chunk "
                  "with text", self.first_token)
        counter("dlm_gateway_prompt_tokens_total", "Prompt tokens, as usage counts them", self.prompt_tokens)
        counter("dlm_gateway_completion_tokens_total", "Completion tokens, as usage counts them (the end token "
                "included)", self.completion_tokens)
        out = "\n".join(lines) + "\n"
        for source in self.sources:
            out += source()
        return out


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request with its status and the time to its response's last byte (for a
    stream, when the stream ends), the refusals of the middlewares inside it (413, ...) included."""

    def __init__(self, app: Any, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = scope["dlm.arrived"] = time.perf_counter()  # the endpoints time the first token from it
        status = 500  # an exception before the response started
        done = False
        self.metrics.in_flight += 1

        async def counting_send(message: Any) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done:
                done = True
                self.metrics.answered(scope["path"], status, time.perf_counter() - start)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.in_flight -= 1
            if not done:  # the client went away, or the app failed, before the last byte
                self.metrics.answered(scope["path"], status if status != 200 else 499, time.perf_counter() - start)
