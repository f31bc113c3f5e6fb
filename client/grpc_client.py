"""gRPC clients of the `dlm` model on `tritonclient.grpc` (blocking) and `tritonclient.grpc.aio` (asyncio).

A decoupled model answers only over gRPC's bidirectional streaming API, so every request, streamed or not, is one
`ModelStreamInfer` call read until the response that carries `triton_final_response`. Closing a stream early (or a
timeout) cancels that call, and Triton tells the model, which stops the request at its next step.

    from client import GrpcClient
    with GrpcClient("localhost:8001") as dlm:
        print(dlm.generate("4821+377=", mode="diffusion").text)
        with dlm.generate_stream("upper:" + "abc" * 12 + "=", max_tokens=40) as stream:
            for block in stream:
                print(block.text, end="", flush=True)
        print(stream.result.tokens_per_forward)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from client.request import Options, tensors
from client.result import Accumulator, Block, DLMError, Result, Timeout, Token, from_grpc, tokens_from

OUTPUTS = ("text_output", "num_forwards", "num_tokens", "finish_reason", "output_log_probs", "output_tokens",
           "output_top_log_probs", "output_top_tokens", "num_cached_tokens")
# text delta, engine passes so far, tokens so far, final, finish reason ("stop" or "length"; "" before the end),
# the delta's tokens with their log probs (None when the response has none), and the prompt tokens the server
# reused (the final response's `num_cached_tokens`; None before it)
Response = tuple[str, int, int, bool, str, tuple[Token, ...] | None, int | None]


def grpc_target(url: str) -> str:
    """'host:port' for tritonclient, from 'host:port' or 'grpc://host:port'."""
    return url.split("://", 1)[1] if "://" in url else url


def infer_inputs(prompt: str, options: Options, stream: bool) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in tensors(prompt, options, stream).items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def parse_response(result: Any) -> Response:
    """(text, num_forwards, num_tokens, final, finish_reason, tokens, cached_tokens) of one `InferResult`."""
    text = result.as_numpy("text_output")
    forwards, tokens = result.as_numpy("num_forwards"), result.as_numpy("num_tokens")
    parameters = result.get_response().parameters
    final = "triton_final_response" in parameters and parameters["triton_final_response"].bool_param
    if text is None:  # an empty final response (flags only)
        return "", 0, 0, final, "", None, None
    reason = result.as_numpy("finish_reason")
    log_probs = result.as_numpy("output_log_probs")
    cached = result.as_numpy("num_cached_tokens")
    return (
        as_text(text), int(forwards.reshape(-1)[0]), int(tokens.reshape(-1)[0]), final,
        "" if reason is None else as_text(reason),
        None if log_probs is None else tokens_from(log_probs, result.as_numpy("output_tokens"),
                                                   result.as_numpy("output_top_log_probs"),
                                                   result.as_numpy("output_top_tokens")),
        None if cached is None else int(cached.reshape(-1)[0]),
    )


def as_text(array: Any) -> str:
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_error(error: Exception) -> DLMError:
    if isinstance(error, DLMError):
        return error
    if isinstance(error, InferenceServerException):
        return from_grpc(error.message() or str(error), error.status())
    if isinstance(error, grpc.RpcError):
        return from_grpc(error.details() or str(error), str(error.code()))
    return DLMError(str(error))


class _Stream:
    """What a stream of either kind keeps: its responses (a generator whose closing cancels an unfinished call)
    and the accumulator that turns them into blocks and a result."""

    def __init__(self, responses: Any, accumulator: Accumulator):
        self._responses = responses
        self._acc = accumulator

    @property
    def result(self) -> Result:
        """The finished request (raises `DLMError` before the stream has been read to its end)."""
        return self._acc.result()


class BlockStream(_Stream):
    """One streamed request: iterate for its `Block`s as they arrive; `result` once it has finished. `close()` (or
    leaving a `with` block) before the end cancels the request on the server."""

    _responses: Generator[Response, None, None]

    def __iter__(self) -> "BlockStream":
        return self

    def __next__(self) -> Block:
        for response in self._responses:
            block = self._acc.add(*response)
            if block is not None:
                return block
        raise StopIteration

    def drain(self) -> Result:
        """Read the stream to its end; the request's `Result`."""
        with self:
            for _ in self:
                pass
        return self.result

    def close(self) -> None:
        self._responses.close()

    def __enter__(self) -> "BlockStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncBlockStream(_Stream):
    """The asyncio counterpart of `BlockStream`: `async for`, `result`, `await aclose()` (or `async with`)."""

    _responses: AsyncGenerator[Response, None]

    def __aiter__(self) -> "AsyncBlockStream":
        return self

    async def __anext__(self) -> Block:
        async for response in self._responses:
            block = self._acc.add(*response)
            if block is not None:
                return block
        raise StopAsyncIteration

    async def drain(self) -> Result:
        async with self:
            async for _ in self:
                pass
        return self.result

    async def aclose(self) -> None:
        await self._responses.aclose()

    async def __aenter__(self) -> "AsyncBlockStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class GrpcClient:
    """Blocking client; safe to share between threads (each request borrows its own stream's connection).

    `timeout` (seconds, per request) bounds a request end to end; when it passes, the call is cancelled and
    `Timeout` is raised. Options are the model's inputs (`client.request.Options`): mode, max_tokens, temperature,
    top_k, top_p, seed, stop_words, block_length, threshold, steps, remask_threshold, max_remasks, min_tokens (or
    min_length), ignore_eos, exclude_input_in_output, sampling_parameters, return_log_probs, top_logprobs."""

    def __init__(self, url: str = "localhost:8001", model: str = "dlm", timeout: float | None = None):
        self.url, self.model, self.timeout = grpc_target(url), model, timeout
        self._idle: list[grpcclient.InferenceServerClient] = []
        self._lock = threading.Lock()

    def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> Result:
        """The whole text in one response (`stream` false)."""
        return self._open(prompt, options, False, timeout).drain()

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **options: Any) -> BlockStream:
        """One `Block` per committed block, as the server commits them."""
        return self._open(prompt, options, True, timeout)

    def _open(self, prompt: str, options: dict[str, Any], stream: bool, timeout: float | None) -> BlockStream:
        inputs = infer_inputs(prompt, Options.of(**options), stream)
        return BlockStream(self._responses(inputs, timeout or self.timeout), Accumulator())

    def _responses(self, inputs: list[grpcclient.InferInput], timeout: float | None) -> Generator[Response, None, None]:
        client = self._borrow()
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: arrived.put((result, error)), stream_timeout=timeout)
            try:
                client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            except InferenceServerException as refused:  # the stream failed already: its callback has the reason
                reason: Exception = refused
                try:
                    reason = arrived.get(timeout=1.0)[1] or refused
                except queue.Empty:
                    pass
                finished = True
                raise to_error(reason) from None
            deadline = None if timeout is None else time.monotonic() + timeout + 5.0  # gRPC's deadline fires first
            while True:
                try:
                    wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    result, error = arrived.get(timeout=wait)
                except queue.Empty:
                    raise Timeout(f"no response within {timeout} s") from None
                if error is not None:
                    finished = True  # an error ends the request on the server
                    raise to_error(error)
                response = parse_response(result)
                finished = response[3]
                yield response
                if finished:
                    return
        except InferenceServerException as error:
            raise to_error(error) from None
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                self._give_back(client)

    def _borrow(self) -> grpcclient.InferenceServerClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return grpcclient.InferenceServerClient(self.url)

    def _give_back(self, client: grpcclient.InferenceServerClient) -> None:
        with self._lock:
            self._idle.append(client)

    def is_ready(self) -> bool:
        client = self._borrow()
        try:
            return client.is_model_ready(self.model)
        except InferenceServerException:
            return False
        finally:
            self._give_back(client)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio client over one channel; any number of requests may run concurrently. Create it inside the event
    loop that uses it. Same options and timeout as `GrpcClient`."""

    def __init__(self, url: str = "localhost:8001", model: str = "dlm", timeout: float | None = None,
                 max_reconnect_backoff_ms: int | None = None):
        """`max_reconnect_backoff_ms`: the longest wait between reconnection attempts once Triton has gone (gRPC's
        default grows to 2 minutes; the gateway beside Triton in a pod asks for 1 s, so a restarted Triton is
        reached again at once)."""
        self.url, self.model, self.timeout = grpc_target(url), model, timeout
        channel_args = None
        if max_reconnect_backoff_ms is not None:
            keepalive = grpcclient.KeepAliveOptions()
            channel_args = [  # tritonclient's defaults, plus the backoff
                ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                ("grpc.initial_reconnect_backoff_ms", min(200, max_reconnect_backoff_ms)),
                ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
            ]
        self._client = aiogrpcclient.InferenceServerClient(self.url, channel_args=channel_args)

    async def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> Result:
        return await self._open(prompt, options, False, timeout).drain()

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **options: Any) -> AsyncBlockStream:
        return self._open(prompt, options, True, timeout)

    def _open(self, prompt: str, options: dict[str, Any], stream: bool, timeout: float | None) -> AsyncBlockStream:
        inputs = infer_inputs(prompt, Options.of(**options), stream)
        return AsyncBlockStream(self._responses(inputs, timeout or self.timeout), Accumulator())

    async def _responses(
        self, inputs: list[grpcclient.InferInput], timeout: float | None
    ) -> AsyncGenerator[Response, None]:
        async def requests():
            yield {"model_name": self.model, "inputs": inputs}

        call = None
        finished = False
        try:
            call = self._client.stream_infer(requests(), stream_timeout=timeout)
            async for result, error in call:
                if error is not None:
                    finished = True
                    raise to_error(error)
                response = parse_response(result)
                finished = response[3]
                yield response
                if finished:
                    return
            raise DLMError("the server closed the stream before the request's final response")
        except (InferenceServerException, grpc.RpcError) as error:
            finished = True
            raise to_error(error) from None
        finally:
            if call is not None and not finished:
                call.cancel()

    async def is_ready(self) -> bool:
        try:
            return await self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncGrpcClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
