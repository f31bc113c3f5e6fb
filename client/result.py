"""What every client returns: one `Result` per request (and a `Block` per streamed delta), and the exceptions a
failed request raises, each carrying the server's message verbatim.

Triton reports a request's error differently per path: over HTTP as a status code plus `{"error": message}`, over
gRPC as an RPC status (connection, deadline, cancellation) or, for an error the model sends on a decoupled stream,
as the message alone (the stream's `error_message` has no code). `from_grpc` classifies that last case by the
wording the model and Triton use for each kind of refusal.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field


class DLMError(Exception):
    """A request failed; `str(error)` is the server's message, `status` what the transport said (if anything)."""

    def __init__(self, message: str, status: str | int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidRequest(DLMError):
    """The server refused the request's inputs (Triton INVALID_ARG, HTTP 400)."""


class ServerUnavailable(DLMError):
    """The server cannot take the request now: unreachable, not ready, its queue full, or shutting down."""


class Cancelled(DLMError):
    """The request was cancelled before it finished."""


class Timeout(DLMError):
    """The request did not finish within the client's timeout; the server was told to stop it."""


@dataclass(frozen=True)
class Block:
    """The text one streamed response committed (a delta) and the request's counts so far."""

    text: str
    num_tokens: int  # committed tokens so far (the end token included)
    num_forwards: int  # engine passes so far (the prefill included)
    seconds: float  # since the request was sent


@dataclass
class Result:
    """One finished request."""

    text: str
    num_tokens: int
    num_forwards: int
    latency: float  # seconds from sending the request to its final response
    time_to_first_block: float  # seconds to the first response that carried text (the latency if none did)
    blocks: int = 0  # responses that carried text
    finish_reason: str = ""  # "stop" (an end token or a stop word) or "length" (max_tokens reached)

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per engine pass after the prompt's prefill, as the server's metrics count them."""
        return self.num_tokens / max(self.num_forwards - 1, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_forward": self.tokens_per_forward}


@dataclass
class Accumulator:
    """Builds a request's `Block`s and final `Result` from its responses, as they arrive."""

    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_forwards: int = 0
    first: float | None = None
    end: float | None = None
    finish_reason: str = ""

    def add(self, text: str, num_forwards: int, num_tokens: int, final: bool, finish_reason: str = "") -> Block | None:
        now = time.perf_counter() - self.start
        if num_forwards:  # an empty final response carries no counts
            self.num_forwards, self.num_tokens = num_forwards, num_tokens
        self.finish_reason = finish_reason or self.finish_reason
        if final:
            self.end = now
        if not text:
            return None
        if self.first is None:
            self.first = now
        self.parts.append(text)
        return Block(text, num_tokens, num_forwards, now)

    @property
    def finished(self) -> bool:
        return self.end is not None

    def result(self) -> Result:
        if self.end is None:
            raise DLMError("the request has not finished: read its stream to the end first")
        first = self.end if self.first is None else self.first
        return Result("".join(self.parts), self.num_tokens, self.num_forwards, self.end, first, len(self.parts),
                      self.finish_reason)


# Wording of the refusals the model (dlm/inputs.py, dlm/scheduler.py) and Triton's request checks send on a
# decoupled gRPC stream, where no status code comes with the message.
_CANCELLED = re.compile(r"\bcancel", re.IGNORECASE)
_UNAVAILABLE = re.compile(r"queue is full|shutting down|shut down|not ready|unavailable|retry later", re.IGNORECASE)
_INVALID = re.compile(
    r"\bmust (be|hold)\b|\bis unknown\b|\bis missing\b|\bis empty\b|\bis not valid\b|\bexceeds\b|\bexpects\b|"
    r"unexpected inference input|unable to parse|\binvalid\b",
    re.IGNORECASE,
)

_GRPC_CODES = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequest,
    "StatusCode.UNAVAILABLE": ServerUnavailable,
    "StatusCode.RESOURCE_EXHAUSTED": ServerUnavailable,
    "StatusCode.NOT_FOUND": InvalidRequest,
    "StatusCode.CANCELLED": Cancelled,
    "StatusCode.DEADLINE_EXCEEDED": Timeout,
}

_HTTP_CODES = {400: InvalidRequest, 404: InvalidRequest, 408: Timeout, 429: ServerUnavailable, 499: Cancelled,
               502: ServerUnavailable, 503: ServerUnavailable, 504: Timeout}


def classify_message(message: str) -> type[DLMError]:
    if _CANCELLED.search(message):
        return Cancelled
    if _UNAVAILABLE.search(message):
        return ServerUnavailable
    if _INVALID.search(message):
        return InvalidRequest
    return DLMError


def from_grpc(message: str, status: str | None) -> DLMError:
    """An error from tritonclient's gRPC clients: `status` is the RPC status ('StatusCode.X') or None for an
    error response the model sent on the stream."""
    kind = _GRPC_CODES.get(status or "") or classify_message(message)
    return kind(message, status)


def from_http(message: str, status: int) -> DLMError:
    """An error from Triton's HTTP endpoints: the status code and the body's `error` message."""
    kind = _HTTP_CODES.get(status) or (classify_message(message) if status >= 500 else DLMError)
    return kind(message, status)
