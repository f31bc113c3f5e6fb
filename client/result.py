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
from typing import Any


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
class Alternative:
    """A token the model gave a log prob: its raw bytes (exact, even when they are part of a UTF-8 character)."""

    token: bytes
    logprob: float

    @property
    def text(self) -> str:
        """The bytes as text; an incomplete character shows as U+FFFD."""
        return self.token.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.text, "bytes": list(self.token), "logprob": self.logprob}


@dataclass(frozen=True)
class Token(Alternative):
    """A generated token, its log prob, and (when asked for) its best alternatives, best first."""

    top_logprobs: tuple[Alternative, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "top_logprobs": [a.to_dict() for a in self.top_logprobs]}


def _flat(value: Any) -> list[Any]:
    """A tensor's values in order: from a numpy array, or from Triton's generate JSON, which writes a one-element
    tensor as a scalar and a [n, k] one as a flat list."""
    if value is None:
        return []
    if hasattr(value, "reshape"):
        return list(value.reshape(-1).tolist())
    return list(value) if isinstance(value, list) else [value]


def _raw(value: Any) -> bytes:
    """A BYTES element: bytes over gRPC; over HTTP a string whose undecodable bytes are surrogate escapes."""
    return bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8", "surrogateescape")


def tokens_from(log_probs: Any, tokens: Any, top_log_probs: Any = None, top_tokens: Any = None) -> tuple[Token, ...]:
    """The `Token`s of one response's `output_log_probs`, `output_tokens`, `output_top_log_probs` and
    `output_top_tokens`."""
    pieces, values = [_raw(t) for t in _flat(tokens)], [float(v) for v in _flat(log_probs)]
    if len(pieces) != len(values):
        raise DLMError(f"the response has {len(pieces)} output_tokens but {len(values)} output_log_probs")
    top_pieces, top_values = [_raw(t) for t in _flat(top_tokens)], [float(v) for v in _flat(top_log_probs)]
    k = len(top_values) // len(pieces) if pieces else 0
    if len(top_pieces) != len(top_values) or k * len(pieces) != len(top_values):
        raise DLMError(f"the response's output_top_tokens ({len(top_pieces)}) and output_top_log_probs "
                       f"({len(top_values)}) do not hold the same number of alternatives for each of its "
                       f"{len(pieces)} tokens")
    return tuple(
        Token(piece, value, tuple(Alternative(top_pieces[j], top_values[j]) for j in range(i * k, (i + 1) * k)))
        for i, (piece, value) in enumerate(zip(pieces, values))
    )


@dataclass(frozen=True)
class Block:
    """The text one streamed response committed (a delta) and the request's counts so far."""

    text: str
    num_tokens: int  # committed tokens so far (the end token included)
    num_forwards: int  # engine passes so far (the prefill included)
    seconds: float  # since the request was sent
    tokens: tuple[Token, ...] = ()  # the delta's tokens with their log probs, when the request asked for them


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
    # the text's tokens with their log probs (the end token excluded); None unless the request asked for them
    tokens: list[Token] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values the server reused (prefix caching)

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per engine pass after the prompt's prefill, as the server's metrics count them."""
        return self.num_tokens / max(self.num_forwards - 1, 1)

    def to_dict(self) -> dict:
        out = {**asdict(self), "tokens_per_forward": self.tokens_per_forward}
        if self.tokens is None:
            del out["tokens"]
        else:
            out["tokens"] = [t.to_dict() for t in self.tokens]
        return out


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
    tokens: list[Token] | None = None  # None until a response carries log probs
    cached_tokens: int = 0

    def add(self, text: str, num_forwards: int, num_tokens: int, final: bool, finish_reason: str = "",
            tokens: tuple[Token, ...] | None = None, cached_tokens: int | None = None) -> Block | None:
        """One response; its `Block`, or None when it carried neither text nor tokens. `cached_tokens`: the
        final response's `num_cached_tokens` (None where a response has none)."""
        now = time.perf_counter() - self.start
        if cached_tokens is not None:
            self.cached_tokens = cached_tokens
        if num_forwards:  # an empty final response carries no counts
            self.num_forwards, self.num_tokens = num_forwards, num_tokens
        self.finish_reason = finish_reason or self.finish_reason
        if final:
            self.end = now
        if tokens is not None:
            self.tokens = (self.tokens or []) + list(tokens)
        if not text and not tokens:
            return None
        if text and self.first is None:
            self.first = now
        if text:
            self.parts.append(text)
        return Block(text, num_tokens, num_forwards, now, tokens or ())

    @property
    def finished(self) -> bool:
        return self.end is not None

    def result(self) -> Result:
        if self.end is None:
            raise DLMError("the request has not finished: read its stream to the end first")
        first = self.end if self.first is None else self.first
        return Result("".join(self.parts), self.num_tokens, self.num_forwards, self.end, first, len(self.parts),
                      self.finish_reason, self.tokens, self.cached_tokens)


# Wording of the refusals the model (dlm/inputs.py, dlm/scheduler.py) and Triton's request checks send on a
# decoupled gRPC stream, where no status code comes with the message.
_CANCELLED = re.compile(r"\bcancel", re.IGNORECASE)
_UNAVAILABLE = re.compile(r"queue is full|shutting down|shut down|not ready|unavailable|retry later", re.IGNORECASE)
_INVALID = re.compile(
    r"\bmust (be|hold|agree)\b|\b(is|are) unknown\b|\bis missing\b|\bis empty\b|\bis not valid\b|\bexceeds\b|"
    r"\bexpects\b|unexpected inference input|unable to parse|\binvalid\b|\ballows at most\b|\bmore than the\b",
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
