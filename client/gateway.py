"""OpenAI-compatible HTTP gateway in front of the `dlm` Triton model (FastAPI + uvicorn + sse-starlette).

    python -m client.gateway --triton localhost:8001 --port 9000 [--api-key KEY] [--tokenizer DIR] [--max-body-bytes N]

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`; `stream: true` answers with server-sent
  events in OpenAI's chunk format, ending with `data: [DONE]`; `stream_options.include_usage` adds a usage chunk,
  `stream_options.continuous_usage_stats` (vLLM's) puts the usage so far in every chunk.
- The DLM controls ride along as extra body fields: `mode`, `threshold`, `steps` (with `threshold`: the most passes
  per block), `block_length`, `remask_threshold`, `max_remasks` (with the `openai` package:
  `extra_body={"mode": "speculative"}`). `max_tokens`, `temperature`, `top_p`, `seed` and `stop` map to the model's
  inputs, and so do vLLM's extra fields `top_k` (0 or below: not set), `min_tokens` and `ignore_eos`; left out, the
  server's defaults apply (no `seed`: a fresh one per request). `frequency_penalty`, `presence_penalty` ([-2, 2])
  and vLLM's `repetition_penalty` ((0, 2]) map to the model's penalty inputs (applied to the engine's candidates,
  exact within them).
- Log probs: completions `logprobs: n` and chat `logprobs: true` with `top_logprobs: n` (n in [0, 20]), unary and
  streamed (each chunk carries its own tokens'), in OpenAI's formats (`client/openai_logprobs.py`). An n beyond the
  engine's candidates is refused by the server, with its message.
- Each request is one gRPC stream to Triton; a client that disconnects (streaming or not) cancels its request there.
- One gateway talks to one Triton (`--triton host:port`): on Kubernetes it runs beside Triton in the same pod, and
  the pod's gateway port is what the llm-d router (the InferencePool's endpoint picker) routes to and scrapes.
  Nothing here routes between replicas. A request Triton cannot take (down, not ready, queue full) gets 503.
- `GET /health` (no API key): 200 while Triton's model is ready, else 503 (also while draining);
  `GET /metrics` (no API key): the gateway's requests, errors, latency and tokens (`client/gateway_metrics.py`),
  then the model-server protocol's gauges read from Triton's metrics port (`client/replica_gauges.py`:
  `dlm:num_requests_waiting`, `dlm:num_requests_running`, `dlm:kv_cache_usage_perc`), in Prometheus' text format.
- SIGTERM drains (`client/drain.py`): /health turns 503 at once, new requests get 503, running ones finish, and the
  process exits when none is left or after `--drain-seconds`.
- Chat messages become a prompt through the checkpoint's chat template (`--tokenizer`, default the model
  repository's tokenizer folder), rendered as transformers renders it (`client/chat_template.py`), with vLLM's
  `chat_template_kwargs` (e.g. `{"enable_thinking": true}`) and `documents` passed to the template; the rendered
  prompt is sent with `add_special_tokens` false, so the tokenizer adds no second BOS (as transformers'
  `apply_chat_template(..., tokenize=True)`). A completion prompt gets the tokenizer's special tokens.
  `usage.prompt_tokens` counts the prompt exactly as the server encodes it, and
  `usage.prompt_tokens_details.cached_tokens` the part of it Triton reused from its prefix cache.
- Structured outputs (chat): `response_format` `{"type": "json_object"}` and `{"type": "json_schema", "json_schema":
  {"schema": ..., "strict": true}}` map to the model's guided decoding inputs (json / json_schema; the answer is
  decoded under the grammar, in every mode); a schema the compiler refuses
  comes back as a 400 with its message.
- Tool calls (chat, `client/tool_calls.py`): `tools` go to the chat template; the answer, in the template's
  `<tool_call>{json}</tool_call>` or `<TOOLCALL>[json, ...]</TOOLCALL>` syntax (`--tool-call-parser`), comes back
  as `tool_calls` with `finish_reason` `tool_calls`, streamed as deltas; `tool_choice` `required` or a named
  function is decoded under a grammar of the
  calls (every mode), `parallel_tool_calls: false` allows one; `"none"` leaves the answer as text.
- Fields not honoured are refused with a 400 that names them (`NOT_HONOURED`: `logit_bias`,
  `functions`, `function_call`, ...; `echo`, `best_of`, `suffix`, `n` > 1), and so is
  any field neither OpenAI nor vLLM defines; identifiers and hints (`user`, `metadata`, ...) are accepted.
- Errors are OpenAI error objects: 400 for a malformed body or a value the server refuses (with Triton's message),
  401 for a missing or wrong API key (when `--api-key` or `DLM_GATEWAY_API_KEY` is set), 404 for an unknown model,
  503 when Triton cannot take the request, 504 on a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from client import tool_calls
from client.chat_template import ChatTemplate, TemplateError
from dlm.tokenizer_files import load_tokenizer
from client.gateway_metrics import GatewayMetrics, MetricsMiddleware
from client.drain import Drain, DrainGate, DrainingServer
from client.grpc_client import AsyncBlockStream, AsyncGrpcClient
from client.openai_logprobs import MAX_LOGPROBS, CompletionLogprobs, chat_logprobs
from client.replica_gauges import ReplicaGauges, triton_metrics_url
from client.result import Block, DLMError, InvalidRequest, Result, ServerUnavailable, Timeout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT / "model_repository" / "dlm" / "1" / "tokenizer"


# --- request bodies ----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


# OpenAI fields that change nothing we could honour differently (identifiers and hints): accepted as they come
ACCEPTED_AS_IS = frozenset({"user", "safety_identifier", "prompt_cache_key", "metadata"})
# OpenAI fields not honoured yet, with the value that asks for nothing (accepted): any other value is refused by name
NOT_HONOURED = {
    "logit_bias": ({}, "logit_bias is not supported (send {} or leave it out)"),
    "functions": ([], "functions (the deprecated tools) are not supported"),
    "function_call": ("none", "function_call (the deprecated tool_choice) is not supported"),
    "store": (False, "store: true is not supported: this gateway stores no completions"),
    "service_tier": ("auto", "service_tier other than \"auto\" or \"default\" is not supported"),
    "modalities": (["text"], "only the text modality is supported"),
    "audio": (None, "audio output is not supported"),
    "prediction": (None, "predicted outputs (prediction) are not supported"),
    "reasoning_effort": (None, "reasoning_effort is not supported: send chat_template_kwargs (e.g. "
                               "{\"enable_thinking\": true}) to a template that has a thinking switch"),
    "web_search_options": (None, "web_search_options is not supported"),
    "verbosity": (None, "verbosity is not supported"),
}


def _asks_for_nothing(name: str, value: Any) -> bool:
    default = NOT_HONOURED[name][0]
    if name == "service_tier":
        return value in (None, "auto", "default")
    return value is None or value == default


class GenerationFields(BaseModel):
    """What both endpoints accept. Every field OpenAI defines that this gateway does not honour is refused by name
    with a 400 when it asks for something (`NOT_HONOURED`), and so is any field neither OpenAI nor vLLM defines."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = None  # in (0, 1]
    top_k: int | None = None  # vLLM's extra field; 0 or below (vLLM's -1): not set
    min_tokens: int | None = None  # vLLM's extra field: no end token before this many tokens
    ignore_eos: bool | None = None  # vLLM's extra field: no end token at all, decode to max_tokens
    # on the engine's candidates (exact within them): OpenAI's two in [-2, 2], vLLM's repetition_penalty in (0, 2]
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # the DLM controls
    mode: str | None = None
    threshold: float | None = None
    steps: int | None = None
    block_length: int | None = None
    remask_threshold: float | None = None
    max_remasks: int | None = None
    draft_adapter: bool | None = None  # speculative: false drafts with the base weights

    def unsupported(self) -> tuple[str, str] | None:
        for name, value in (self.model_extra or {}).items():
            if name in NOT_HONOURED:
                if not _asks_for_nothing(name, value):
                    return name, NOT_HONOURED[name][1]
            elif name not in ACCEPTED_AS_IS:
                return name, f"unknown field '{name}': this gateway takes OpenAI's fields, vLLM's top_k, min_tokens, " \
                             f"ignore_eos, repetition_penalty and chat_template_kwargs, and the DLM controls"
        if self.n != 1:
            return "n", "only n = 1 is supported"
        # checked here too: sent as FP32, a value just beyond a bound would round onto it and pass the server's check
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # NaN fails too
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}"
        if self.remask_threshold is not None and not 0.0 < self.remask_threshold < 1.0:
            return "remask_threshold", f"remask_threshold must be in (0, 1), got {self.remask_threshold}"
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not -2.0 <= value <= 2.0:  # NaN fails too
                return name, f"{name} must be in [-2, 2], got {value}"
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty <= 2.0:
            return "repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"
        return None

    def alternatives(self) -> int | None:
        """Alternatives per token the request asks for, or None for no log probs."""
        return None

    def guide(self, syntax: tool_calls.Syntax | None = None) -> dict[str, str]:
        """The guided decoding inputs of `response_format` or of an enforced tool_choice in `syntax` (chat only)."""
        return {}

    def options(self, max_tokens: int | None = None, add_special_tokens: bool = True,
                syntax: tool_calls.Syntax | None = None) -> dict[str, Any]:
        values = {
            "mode": self.mode, "max_tokens": max_tokens or self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k if self.top_k is not None and self.top_k > 0 else None,
            "seed": self.seed, "stop_words": [self.stop] if isinstance(self.stop, str) else self.stop,
            "block_length": self.block_length, "threshold": self.threshold, "steps": self.steps,
            "remask_threshold": self.remask_threshold, "max_remasks": self.max_remasks,
            "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos, "draft_adapter": self.draft_adapter,
            "frequency_penalty": self.frequency_penalty or None, "presence_penalty": self.presence_penalty or None,
            "repetition_penalty": None if self.repetition_penalty in (None, 1.0) else self.repetition_penalty,
        }
        values.update(self.guide(syntax))
        alternatives = self.alternatives()
        if alternatives is not None:
            values.update(return_log_probs=True, top_logprobs=alternatives)
        if not add_special_tokens:  # a rendered chat template: its special tokens are written already
            values["add_special_tokens"] = False
        return {k: v for k, v in values.items() if v is not None}


def out_of_range(name: str, value: int | None) -> tuple[str, str] | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        return name, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}"
    return None


class CompletionRequest(GenerationFields):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None  # alternatives per token, 0 to 20

    def alternatives(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if problem := out_of_range("logprobs", self.logprobs):
            return problem
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of = 1 is supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if isinstance(self.prompt, list) and (self.stream and len(self.prompt) != 1 or not self.prompt):
            return "prompt", "a streamed completion takes exactly one prompt" if self.prompt else "prompt is empty"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    # vLLM's: extra keywords for the chat template (e.g. enable_thinking), and documents for RAG templates
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives per token, 0 to 20; needs logprobs
    # structured outputs: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
    # {"name": ..., "schema": {...}, "strict": true}}, decoded under the grammar (guided decoding)
    response_format: dict[str, Any] | None = None
    # tool calls (client/tool_calls.py): tools rendered by the chat template, the answer parsed into tool_calls;
    # "required" or a named function decoded under a grammar of the calls
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def parses_tool_calls(self) -> bool:
        """Whether the answer is read for tool calls: tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def unsupported(self) -> tuple[str, str] | None:
        kind = None if self.response_format is None else self.response_format.get("type")
        if kind not in (None, "text", "json_object", "json_schema"):
            return "response_format", (f"response_format type {json.dumps(kind)} is not supported: expected text, "
                                       "json_object or json_schema")
        if kind == "json_schema":
            spec = (self.response_format or {}).get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                return "response_format", "response_format json_schema needs json_schema: {name, schema (an object)}"
        if problem := out_of_range("top_logprobs", self.top_logprobs):
            return problem
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if tool_calls.enforced(self.tool_choice) and kind in ("json_object", "json_schema"):
            return "response_format", "response_format json_object or json_schema cannot be combined with " \
                                      "tool_choice \"required\" or a named function: the answer is the tool calls"
        return super().unsupported()

    def guide(self, syntax: tool_calls.Syntax | None = None) -> dict[str, str]:
        if self.tools and syntax is not None and tool_calls.enforced(self.tool_choice):
            return {"guided_decoding_guide_type": "lark", "guided_decoding_guide": tool_calls.grammar(
                syntax, self.tools, self.tool_choice, parallel=self.parallel_tool_calls is not False)}
        kind = None if self.response_format is None else self.response_format.get("type")
        if kind == "json_object":
            return {"guided_decoding_guide_type": "json"}
        if kind == "json_schema":
            schema = (self.response_format or {})["json_schema"].get("schema", {})
            return {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(schema)}
        return {}


# --- errors ------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(error: DLMError) -> APIError:
    """A failed Triton request as the OpenAI error it amounts to, with Triton's message verbatim."""
    if isinstance(error, InvalidRequest):
        return APIError(400, str(error))
    if isinstance(error, ServerUnavailable):
        return APIError(503, str(error), "server_error", code="unavailable")
    if isinstance(error, Timeout):
        return APIError(504, str(error), "server_error", code="timeout")
    return APIError(500, str(error), "server_error")


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    param = None
    for item in error.errors():
        if item.get("type") == "json_invalid":
            return f"the body is not valid JSON: {item.get('ctx', {}).get('error', item.get('msg'))}", None
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        param = param or (location[0] if location else None)
        where = ".".join(location)
        problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "invalid request body: " + "; ".join(problems), param


# --- the app -----------------------------------------------------------------------------------------------------
class Gateway:
    """State shared by the endpoints: the Triton client, the tokenizer and chat template, the request defaults."""

    def __init__(self, triton_url: str, model: str, served_name: str, tokenizer: Path | None,
                 timeout: float | None, triton_metrics: str | None = None, drain_seconds: float = 30.0,
                 tool_call_parser: str = "auto"):
        self.triton_url, self.model, self.served_name, self.timeout = triton_url, model, served_name, timeout
        self.triton_metrics = triton_metrics or triton_metrics_url(triton_url)
        self.drain = Drain(drain_seconds)
        self.template = ChatTemplate.from_directory(tokenizer)
        self.tool_call_parser = tool_calls.parser_for(self.template.source, tool_call_parser)
        self.metrics = GatewayMetrics()
        self.tokenizer = None
        if tokenizer is not None and (Path(tokenizer) / "tokenizer.json").is_file():
            self.tokenizer = load_tokenizer(tokenizer)  # as the server's model encodes prompts
        self.created = int(time.time())
        self._client: AsyncGrpcClient | None = None
        self.gauges: ReplicaGauges | None = None  # set in the lifespan, like the client

    @property
    def client(self) -> AsyncGrpcClient:
        if self._client is None:
            raise RuntimeError("the gateway's Triton client exists only while the app runs (its lifespan)")
        return self._client

    @client.setter
    def client(self, client: AsyncGrpcClient) -> None:
        self._client = client

    def prompt_tokens(self, prompt: str, add_special_tokens: bool = True) -> int:
        if self.tokenizer is None:
            return 0
        return len(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids)

    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(404, f"The model '{name}' does not exist; this gateway serves '{self.served_name}'",
                           param="model", code="model_not_found")


class BodyLimit:
    """ASGI middleware: a request body beyond `limit` bytes is refused with 413 as soon as it is seen to be too
    long, whether the client declares its length or streams it in chunks; a body within the limit is read here
    and handed on whole."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        handed = False

        async def replay() -> Any:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what comes after the body: the client disconnecting

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        error = APIError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(triton_url: str, model: str = "dlm", served_name: str | None = None,
               tokenizer: str | Path | None = DEFAULT_TOKENIZER, api_key: str | None = None,
               timeout: float | None = None, max_body_bytes: int = 1 << 20, triton_metrics: str | None = None,
               drain_seconds: float = 30.0, tool_call_parser: str = "auto") -> FastAPI:
    gateway = Gateway(triton_url, model, served_name or model, Path(tokenizer) if tokenizer else None, timeout,
                      triton_metrics, drain_seconds, tool_call_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # inside the serving event loop
        gateway.client = AsyncGrpcClient(triton_url, model, timeout=timeout, max_reconnect_backoff_ms=1000)
        gateway.gauges = ReplicaGauges(gateway.triton_metrics)
        try:
            yield
        finally:
            await gateway.client.close()
            await gateway.gauges.close()

    app = FastAPI(title="dlm OpenAI-compatible gateway", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(DrainGate, drain=gateway.drain)  # refuses new requests while draining, counts running ones
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)  # outermost: it counts BodyLimit's 413s too

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    async def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        """Ready while Triton's model is ready and the gateway is not draining (the pod's readiness probe)."""
        draining = gateway.drain.draining
        triton_ready = False if draining else await gateway.client.is_ready()
        ready = triton_ready and not draining
        body = {"ready": ready, "triton": gateway.triton_url, "triton_ready": triton_ready, "draining": draining,
                "running": gateway.drain.running}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus' text format, without the API key (like /health): the gateway's own requests, errors, latency
        and tokens (client/gateway_metrics.py), then the model-server protocol's gauges read from Triton
        (client/replica_gauges.py); other sections append theirs."""
        gauges = gateway.gauges.text() if gateway.gauges is not None else None
        sections = [gateway.metrics.text(), await gauges if gauges is not None else ""]
        return Response("".join(sections), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        card = {"id": gateway.served_name, "object": "model", "created": gateway.created, "owned_by": "dlm-serving"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        gateway.check_model(body.model)
        refuse_unsupported(body)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        reply = Reply(gateway, "cmpl", "text_completion", body, body.max_tokens)
        if body.stream:
            return await reply.stream(prompts[0], request)
        results = await unless_disconnected(
            request, asyncio.gather(*(reply.generate(p) for p in prompts)))
        choices = [
            {"index": i, "text": r.text, "logprobs": reply.logprobs(r.tokens),
             "finish_reason": reply.finish_reason(r)}
            for i, r in enumerate(results)
        ]
        return reply.answer(choices, prompts, results)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        gateway.check_model(body.model)
        refuse_unsupported(body)
        reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(body.chat_template_kwargs or {})
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(reserved))}: give them as "
                                f"their own fields", param="chat_template_kwargs")
        try:
            tool_calls.check_tools(body.tools, body.tool_choice, body.parallel_tool_calls, gateway.tool_call_parser,
                                   gateway.template.source)
        except tool_calls.ToolCallError as error:
            raise APIError(400, str(error), param=error.param) from error
        try:
            prompt = gateway.template.render([m.as_dict() for m in body.messages], tools=body.tools or None,
                                             documents=body.documents, **(body.chat_template_kwargs or {}))
        except TemplateError as error:
            raise APIError(400, str(error), param="messages") from error
        # a prompt the checkpoint's template rendered holds its special tokens; the plain fallback's gets them added
        reply = Reply(gateway, "chatcmpl", "chat.completion", body, body.max_completion_tokens or body.max_tokens,
                      add_special_tokens=not gateway.template.templates)
        if body.stream:
            return await reply.stream(prompt, request)
        result = await unless_disconnected(request, reply.generate(prompt))
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        finish_reason = reply.finish_reason(result)
        if body.parses_tool_calls():
            assert gateway.tool_call_parser is not None  # check_tools refused tools without one
            content, calls = tool_calls.parse(gateway.tool_call_parser, result.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choice = {"index": 0, "message": message, "logprobs": reply.logprobs(result.tokens),
                  "finish_reason": finish_reason}
        return reply.answer([choice], [prompt], [result])

    return app


def refuse_unsupported(body: GenerationFields) -> None:
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0])


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so its Triton requests) if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # a cancelled one's error is seen
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the connection")
    except DLMError as error:
        raise api_error(error) from None
    finally:
        if not task.done():
            task.cancel()


class Reply:
    """One OpenAI response (or its stream of chunks) for one endpoint."""

    def __init__(self, gateway: Gateway, prefix: str, kind: str, body: GenerationFields, max_tokens: int | None,
                 add_special_tokens: bool = True):
        self.gateway, self.kind, self.body, self.max_tokens = gateway, kind, body, max_tokens
        self.add_special_tokens = add_special_tokens  # false: a rendered chat template (as transformers encodes it)
        self.chat = kind == "chat.completion"
        self.chunk_kind = "chat.completion.chunk" if self.chat else "text_completion"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_logprobs = CompletionLogprobs()  # a streamed completion's text offsets run across chunks
        # a streamed chat answer read for tool calls: its text split into content and tool-call deltas
        syntax = gateway.tool_call_parser
        parses = isinstance(body, ChatRequest) and body.parses_tool_calls() and syntax is not None
        self.tool_stream = tool_calls.ToolCallStream(syntax) if parses and syntax is not None else None
        self.endpoint = "/v1/chat/completions" if self.chat else "/v1/completions"  # for the metrics

    async def generate(self, prompt: str) -> Result:
        return await self.gateway.client.generate(prompt, **self.options())

    def options(self) -> dict[str, Any]:
        """The model's inputs for this request (an enforced tool_choice's grammar in the template's syntax)."""
        return self.body.options(self.max_tokens, self.add_special_tokens, self.gateway.tool_call_parser)

    @staticmethod
    def finish_reason(result: Result) -> str:
        return result.finish_reason or "stop"

    def logprobs(self, tokens: Any) -> dict[str, Any] | None:
        """The `logprobs` of a choice (or chunk) with these tokens; None when the request asked for none."""
        if self.body.alternatives() is None:
            return None
        tokens = tokens or ()
        return chat_logprobs(tokens) if self.chat else CompletionLogprobs().chunk(tokens)

    def usage(self, prompts: list[str], results: list[Result]) -> dict[str, Any]:
        """The usage of a finished response, counted in the gateway's metrics too."""
        prompt_tokens = sum(self.gateway.prompt_tokens(p, self.add_special_tokens) for p in prompts)
        completion_tokens = sum(r.num_tokens for r in results)
        self.gateway.metrics.tokens(self.endpoint, prompt_tokens, completion_tokens)
        return usage_of(prompt_tokens, completion_tokens, sum(r.cached_tokens for r in results))

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.gateway.served_name}

    def answer(self, choices: list[dict], prompts: list[str], results: list[Result]) -> dict[str, Any]:
        forwards = sum(r.num_forwards for r in results)
        dlm = {"num_forwards": forwards, "tokens_per_forward": sum(r.tokens_per_forward for r in results) / len(results),
               "latency": max(r.latency for r in results)}
        return {**self.envelope(self.kind), "choices": choices, "usage": self.usage(prompts, results), "dlm": dlm}

    def chunk(self, block: Block | None, finish_reason: str | None = None, first: bool = False,
              usage: dict[str, int] | None = None, text: str | None = None,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A chunk with `block`'s text (or `text`), log probs, and tool-call deltas `calls`."""
        text = block.text if text is None and block is not None else text
        logprobs = None
        if block is not None and self.body.alternatives() is not None:
            logprobs = chat_logprobs(block.tokens) if self.chat else self.completion_logprobs.chunk(block.tokens)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        out = {**self.envelope(self.chunk_kind), "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    async def stream(self, prompt: str, request: Request) -> Any:
        """Server-sent events; the first block is awaited before answering, so a refused request gets its HTTP
        error status rather than an error event."""
        try:
            stream: AsyncBlockStream = self.gateway.client.generate_stream(prompt, **self.options())
        except DLMError as error:
            raise api_error(error) from None
        try:
            first = await unless_disconnected(request, anext_or_none(stream))
        except BaseException:
            await stream.aclose()
            raise
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)  # vLLM's: the usage so far in every chunk
        prompt_tokens = self.gateway.prompt_tokens(prompt, self.add_special_tokens)
        arrived = request.scope.get("dlm.arrived", time.perf_counter())  # set by MetricsMiddleware

        def so_far(completion_tokens: int) -> dict[str, int] | None:
            return usage_of(prompt_tokens, completion_tokens) if continuous else None

        async def events() -> AsyncIterator[str]:
            timed = False
            try:
                if self.chat:
                    yield json.dumps(self.chunk(None, first=True, usage=so_far(0)))
                if first is not None:
                    blocks = prepend(first, stream)
                    async for block in blocks:
                        if block.text and not timed:
                            timed = True
                            self.gateway.metrics.first_text(self.endpoint, time.perf_counter() - arrived)
                        if self.tool_stream is None:
                            yield json.dumps(self.chunk(block, usage=so_far(block.num_tokens)))
                        else:
                            content, calls = self.tool_stream.feed(block.text or "")
                            yield json.dumps(self.chunk(block, usage=so_far(block.num_tokens), text=content,
                                                        calls=calls))
                result = stream.result
                finish_reason = self.finish_reason(result)
                if self.tool_stream is not None:
                    content, calls = self.tool_stream.feed("", final=True)
                    if content or calls:
                        yield json.dumps(self.chunk(None, usage=so_far(result.num_tokens), text=content, calls=calls))
                    if self.tool_stream.count and finish_reason == "stop":
                        finish_reason = "tool_calls"
                yield json.dumps(self.chunk(None, finish_reason, usage=so_far(result.num_tokens)))
                usage = self.usage([prompt], [result])
                if include_usage:
                    yield json.dumps({**self.envelope(self.chunk_kind), "choices": [], "usage": usage})
            except DLMError as error:
                failure = api_error(error)
                self.gateway.metrics.error(self.endpoint, failure.status)
                yield json.dumps(failure.body())
            finally:
                await stream.aclose()  # cancels the Triton request when the client went away mid-stream
            yield "[DONE]"

        return EventSourceResponse(events(), ping=15)


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; with `cached_tokens` (a finished response's), the prompt tokens Triton did not prefill
    again because their keys and values were cached (prefix caching), as `prompt_tokens_details.cached_tokens`."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


async def prepend(first: Block, stream: AsyncBlockStream) -> AsyncIterator[Block]:
    yield first
    async for block in stream:
        yield block


async def anext_or_none(stream: AsyncBlockStream) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", default="localhost:8001",
                        help="Triton's gRPC address, host:port (grpc:// prefix accepted): the one Triton this "
                             "gateway serves (on Kubernetes, the Triton container beside it in the pod)")
    parser.add_argument("--triton-metrics",
                        help="Triton's metrics URL, read for the model-server gauges on /metrics (default: "
                             "http://<--triton's host>:8002/metrics)")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM, how long running requests may take before the gateway exits (new ones "
                             "are refused at once; default 30)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default="dlm", help="the Triton model to forward to")
    parser.add_argument("--served-model-name", help="the model id clients ask for (default: --model)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                        help="folder with the checkpoint's tokenizer.json and tokenizer_config.json (chat template)")
    parser.add_argument("--api-key", default=os.environ.get("DLM_GATEWAY_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $DLM_GATEWAY_API_KEY; unset: open)")
    parser.add_argument("--timeout", type=float, help="seconds one request may take at Triton")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body accepted (default 1 MiB); a larger one gets 413")
    parser.add_argument("--tool-call-parser", choices=tool_calls.PARSERS, default="auto",
                        help="the syntax the model writes tool calls in (default auto: the one whose opening tag "
                             "the chat template writes, hermes <tool_call> or llama_nemotron_json <TOOLCALL>; with "
                             "none, requests with tools are refused)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app = create_app(args.triton, args.model, args.served_model_name, args.tokenizer, args.api_key, args.timeout,
                     args.max_body_bytes, args.triton_metrics, args.drain_seconds, args.tool_call_parser)
    gateway: Gateway = app.state.gateway
    # the drain has waited for the running requests; uvicorn's own wait only closes idle connections
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, gateway.drain).run()


if __name__ == "__main__":
    main()
