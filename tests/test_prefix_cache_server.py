"""Prefix caching through a real tritonserver and the gateway: a request that repeats a prompt reports the prompt
tokens it reused (`num_cached_tokens` over gRPC and HTTP, `usage.prompt_tokens_details.cached_tokens` through the
OpenAI gateway), the text is the one the first request got, and the Prometheus counters of prefix queries and hits
move by exactly those tokens. `prefix_caching` in config.pbtxt is read at load."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from client import GrpcClient, HttpClient
from conftest import ROOT
from dlm.kv_cache import MIN_COPY
from dlm.text import TextCodec

TOKENIZER = ROOT / "model_repository" / "dlm" / "1" / "tokenizer"
SYSTEM = "You are a careful calculator. Answer with the number only. " * 4
QUERIES, HITS = "dlm_prefix_cache_queries_total", "dlm_prefix_cache_hits_total"


def counters(server, expected: tuple[float, float] | None = None, timeout: float = 20.0) -> tuple[float, float]:
    """The two counters, once they reach `expected` (they are recorded off the engine's path) or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        got = (metrics.get(QUERIES, 0.0), metrics.get(HITS, 0.0))
        if expected is None or got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_repeated_prompt_reports_its_cached_tokens_and_moves_the_counters(triton, protocol):
    prompt = f"{protocol} says: " + SYSTEM + "4821+377="
    tokens = len(TextCodec(TOKENIZER).encode(prompt, True))
    queries, hits = counters(triton)
    with (GrpcClient(triton.grpc_url) if protocol == "grpc" else HttpClient(triton.http_url)) as client:
        first = client.generate(prompt, mode="ar", max_tokens=8, temperature=0)
        again = client.generate(prompt, mode="diffusion", max_tokens=8, temperature=0)
        streamed = client.generate_stream(prompt, mode="ar", max_tokens=8, temperature=0).drain()
    assert first.cached_tokens < MIN_COPY  # nothing resident starts with this prompt (at most a BOS or so)
    assert again.cached_tokens == streamed.cached_tokens == tokens - 1  # all but the last, which always runs
    assert streamed.text == first.text
    want = (queries + 3 * tokens, hits + first.cached_tokens + 2 * (tokens - 1))
    assert counters(triton, want) == want


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_the_gateway_reports_a_second_turn_s_cached_tokens_in_usage(gateway_process, stream):
    with openai.OpenAI(base_url=f"{gateway_process.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        messages = [{"role": "system", "content": f"{stream}: {SYSTEM}"}, {"role": "user", "content": "57+8="}]

        def ask() -> tuple[str, dict]:
            request: dict[str, Any] = {"model": "dlm", "messages": messages, "max_tokens": 8, "temperature": 0,
                                       "extra_body": {"mode": "ar"}}
            if not stream:
                completion = client.chat.completions.create(**request)
                return completion.choices[0].message.content or "", completion.usage.model_dump()
            chunks = list(client.chat.completions.create(**request, stream=True,
                                                          stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.model_dump()

        answer, first = ask()
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and 6+7="}]
        _, second = ask()
    assert first["prompt_tokens_details"]["cached_tokens"] < MIN_COPY  # the template's first tokens, at most
    # the whole first turn, system prompt included, is a prefix of the second
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"]
    assert second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]


def test_config_pbtxt_turns_prefix_caching_off():
    from dlm.deployment import _flag

    assert _flag({}, "prefix_caching", True) is True
    assert _flag({"prefix_caching": ""}, "prefix_caching", True) is True
    assert _flag({"prefix_caching": "false"}, "prefix_caching", True) is False
    assert _flag({"prefix_caching": "True"}, "prefix_caching", False) is True
    with pytest.raises(ValueError, match="prefix_caching = 'maybe' is not valid: expected true or false"):
        _flag({"prefix_caching": "maybe"}, "prefix_caching", True)
