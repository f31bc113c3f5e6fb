"""HTTP client of the `dlm` model on Triton's generate extension: `POST /v2/models/dlm/generate` (one JSON answer)
and `/generate_stream` (server-sent events, one per committed block). Plain `/infer` refuses decoupled models,
and `tritonclient.http` has no generate helper, so this is httpx with httpx-sse.

Triton writes a BYTES output into its JSON as the raw bytes (only JSON's own escapes applied), so a token that is
half a UTF-8 character arrives as invalid UTF-8: the body is decoded with surrogate escapes to keep those bytes
exact (`output_tokens`), where a plain UTF-8 decoding would replace them.

    from client import HttpClient
    with HttpClient("localhost:8000") as dlm:
        print(dlm.generate("4821+377=", mode="ar").text)
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from collections.abc import Generator, Iterator
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from client.grpc_client import BlockStream, Response
from client.request import Options, json_body
from client.result import Accumulator, DLMError, Result, ServerUnavailable, Timeout, from_http, tokens_from


def http_base(url: str) -> str:
    """'http://host:port' from 'host:port' or a full URL."""
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def error_message(body: str) -> str:
    """Triton's `{"error": message}`, or the body itself when it is not that."""
    try:
        value = json.loads(body)
    except ValueError:
        return body.strip()
    return str(value.get("error", body)) if isinstance(value, dict) else body.strip()


@contextmanager
def transport_errors() -> Iterator[None]:
    """httpx's connection and timeout errors as the client's exceptions."""
    try:
        yield
    except httpx.TimeoutException as error:
        raise Timeout(f"no response in time: {error}") from None
    except httpx.TransportError as error:
        raise ServerUnavailable(f"cannot reach the server: {error}") from None


def encoded(body: dict[str, Any]) -> dict[str, Any]:
    """The request body as httpx arguments. NaN and infinities are written as JSON's common extension (`NaN`),
    which Triton's parser reads, so the server answers them with its own message (httpx's `json=` refuses them)."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def exact_json(body: bytes) -> Any:
    """A JSON body whose strings may hold raw non-UTF-8 bytes: those become surrogate escapes."""
    return json.loads(body.decode("utf-8", "surrogateescape"))


def parse_event(data: dict[str, Any], final: bool) -> Response:
    tokens = None
    if "output_log_probs" in data:
        tokens = tokens_from(data["output_log_probs"], data.get("output_tokens"), data.get("output_top_log_probs"),
                             data.get("output_top_tokens"))
    cached = data.get("num_cached_tokens")
    return (str(data.get("text_output", "")), int(data.get("num_forwards", 0)), int(data.get("num_tokens", 0)), final,
            str(data.get("finish_reason", "")), tokens, None if cached is None else int(cached))


class HttpClient:
    """Blocking HTTP client over one connection pool; same options and timeout as `GrpcClient`."""

    def __init__(self, url: str = "localhost:8000", model: str = "dlm", timeout: float | None = None):
        self.base, self.model, self.timeout = http_base(url), model, timeout
        self._http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(timeout))

    def _url(self, endpoint: str) -> str:
        return f"/v2/models/{self.model}/{endpoint}"

    def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> Result:
        """The whole text in one response (`/generate`). On a timeout the connection is closed, but Triton notices
        a gone client only when it writes, so the request runs to its end on the server (streams are cancelled)."""
        accumulator = Accumulator()
        body = json_body(prompt, Options.of(**options), stream=False)
        with transport_errors():
            response = self._http.post(self._url("generate"), **encoded(body), **self._timeout(timeout or self.timeout))
        if response.status_code != 200:
            raise from_http(error_message(response.text), response.status_code)
        accumulator.add(*parse_event(exact_json(response.content), final=True))
        return accumulator.result()

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **options: Any) -> BlockStream:
        """One `Block` per committed block (`/generate_stream`); closing the stream closes the connection."""
        body = json_body(prompt, Options.of(**options), stream=True)
        return BlockStream(self._events(body, timeout or self.timeout), Accumulator())

    def _timeout(self, timeout: float | None) -> dict[str, Any]:
        return {} if timeout is None else {"timeout": timeout}

    def _events(self, body: dict[str, Any], timeout: float | None) -> Generator[Response, None, None]:
        with transport_errors():
            url = self._url("generate_stream")
            with connect_sse(self._http, "POST", url, **encoded(body), **self._timeout(timeout)) as source:
                status = source.response.status_code
                if "text/event-stream" not in source.response.headers.get("content-type", ""):
                    raise from_http(error_message(source.response.read().decode()), status)
                source.response.encoding = "latin-1"  # one character per byte: the events' bytes stay exact
                last = None
                deadline = None if timeout is None else time.monotonic() + timeout
                try:
                    for event in source.iter_sse():
                        data = exact_json(event.data.encode("latin-1"))
                        if "error" in data:
                            raise from_http(str(data["error"]), status)
                        if deadline is not None and time.monotonic() > deadline:  # leaving closes the connection
                            raise Timeout(f"the request did not finish within {timeout} s")
                        last = parse_event(data, final=False)
                        yield last
                except SSEError as error:
                    raise DLMError(f"unexpected answer from {self.base}: {error}") from None
                if last is None:
                    raise DLMError("the server closed the stream without a response")
                # the stream ends after the request's final response: repeat its counts, marked final
                yield "", last[1], last[2], True, last[4], None, last[6]

    def is_ready(self) -> bool:
        try:
            return self._http.get(f"/v2/models/{self.model}/ready").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
