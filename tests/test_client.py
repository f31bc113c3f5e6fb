"""The client library (`client/`) against a real tritonserver: unary and streaming in every mode over gRPC (blocking
and asyncio) and HTTP, cancellation when a stream is closed early, timeouts, and server errors raised as exceptions
that carry Triton's message."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest

from client import AsyncGrpcClient, Block, GrpcClient, HttpClient, InvalidRequest, ServerUnavailable, Timeout, Token
from client.http_client import exact_json, parse_event
from client.request import Options, json_body, tensors
from client.result import Alternative, Cancelled, DLMError, from_grpc, from_http, tokens_from
from export.tasks import held_out_set
from test_server import wait_for_metric
from triton_server import ENDLESS_PROMPT, ENDLESS_TOKENS, free_port, given_up_until_cancelled

MODES = ["ar", "diffusion", "speculative"]
PROBLEM = held_out_set("upper", 2)[1]  # a 37-token answer: several blocks in every mode
LONG, ANSWER = PROBLEM.prompt, PROBLEM.answer


@pytest.fixture(scope="module")
def clients(triton):
    grpc, http = GrpcClient(triton.grpc_url), HttpClient(triton.http_url)
    yield {"grpc": grpc, "http": http}
    grpc.close()
    http.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", MODES)
def test_unary_generation(clients, protocol, mode):
    result = clients[protocol].generate(LONG, mode=mode, max_tokens=48)
    assert result.text == ANSWER
    assert result.num_tokens == len(ANSWER) + 1  # the end token counts
    assert result.blocks == 1 and result.time_to_first_block == result.latency > 0
    if mode == "ar":
        assert result.num_forwards == result.num_tokens  # the prefill gives the first token
    else:
        assert result.tokens_per_forward > 3


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", MODES)
def test_streaming_yields_blocks_as_they_commit(clients, protocol, mode):
    unary = clients[protocol].generate(LONG, mode=mode, max_tokens=48)
    with clients[protocol].generate_stream(LONG, mode=mode, max_tokens=48) as stream:
        blocks = list(stream)
    result = stream.result
    assert all(isinstance(b, Block) and b.text for b in blocks) and len(blocks) >= 2
    assert "".join(b.text for b in blocks) == result.text == ANSWER
    counts = [(b.num_forwards, b.num_tokens, b.seconds) for b in blocks]
    assert counts == sorted(counts)  # passes, tokens and time only grow
    assert (result.num_forwards, result.num_tokens) == (unary.num_forwards, unary.num_tokens)
    assert result.blocks == len(blocks) and 0 < result.time_to_first_block < result.latency


def test_asyncio_client_runs_requests_concurrently(triton):
    async def run():
        async with AsyncGrpcClient(triton.grpc_url) as client:
            unary = await asyncio.gather(*(client.generate(LONG, mode=m, max_tokens=48) for m in MODES))
            stream = client.generate_stream(LONG, mode="diffusion", max_tokens=48)
            async with stream:
                blocks = [block async for block in stream]
            return unary, blocks, stream.result

    unary, blocks, streamed = asyncio.run(run())
    assert [r.text for r in unary] == [ANSWER] * 3
    assert "".join(b.text for b in blocks) == streamed.text == ANSWER and len(blocks) >= 2


def close_after_first_block(kind: str, url: str) -> Block:
    if kind == "grpc-asyncio":
        async def run():
            async with AsyncGrpcClient(url) as client:
                stream = client.generate_stream(ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS)
                first = await stream.__anext__()
                await stream.aclose()
                return first

        return asyncio.run(run())
    client = GrpcClient(url) if kind == "grpc" else HttpClient(url)
    with client, client.generate_stream(ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS) as stream:
        return next(stream)


@pytest.mark.parametrize("kind", ["grpc", "grpc-asyncio", "http"])
def test_a_stream_closed_early_cancels_the_request_on_the_server(triton, kind):
    key = 'dlm_requests_total{mode="ar",outcome="cancelled"}'
    url = triton.http_url if kind == "http" else triton.grpc_url
    first = given_up_until_cancelled(triton, key, lambda: close_after_first_block(kind, url))
    assert first.text and first.num_tokens == 1  # `ar` streams token by token: 199 were left
    assert wait_for_metric(triton, "dlm_live_slots", lambda v: v == 0) == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_invalid_input_raises_with_the_server_message(clients, protocol, stream):
    client = clients[protocol]
    with pytest.raises(InvalidRequest) as raised:
        if stream:
            list(client.generate_stream(LONG, threshold=1.5))
        else:
            client.generate(LONG, threshold=1.5)
    assert str(raised.value) == "threshold must be in (0, 1], got 1.5"
    with pytest.raises(InvalidRequest, match=r"^mode 'fast' is unknown: expected one of ar, diffusion, speculative$"):
        client.generate(LONG, mode="fast")
    with pytest.raises(InvalidRequest, match=r"^top_p must be in \(0, 1\], got nan$"):  # HTTP: JSON's NaN
        list(client.generate_stream(LONG, top_p=float("nan"))) if stream else client.generate(LONG, top_p=math.nan)
    assert client.generate("4821+377=", mode="ar", max_tokens=8).text  # the server goes on serving


def test_asyncio_client_raises_the_server_message(triton):
    async def run():
        async with AsyncGrpcClient(triton.grpc_url) as client:
            await client.generate(LONG, steps=0)

    with pytest.raises(InvalidRequest, match=r"^steps must be in \[1, 32\], got 0$"):
        asyncio.run(run())


# one token per pass: about 48 passes of a 32-token block, 150 ms or more, against timeouts of 50 ms
# four blocks of 32 passes each, end tokens held back: over HTTP the server notices a client that has gone only
# when a write fails, which may take two writes, and two blocks (the answer's length) let the request end first
SLOW = {"mode": "diffusion", "steps": 32, "max_tokens": 128, "ignore_eos": True}


@pytest.mark.parametrize("protocol, stream", [("grpc", False), ("grpc", True), ("http", True)])
def test_timeout_raises_and_cancels(triton, clients, protocol, stream):
    def time_out() -> None:
        with pytest.raises(Timeout):
            if stream:
                list(clients[protocol].generate_stream(LONG, timeout=0.05, **SLOW))
            else:
                clients[protocol].generate(LONG, timeout=0.05, **SLOW)

    given_up_until_cancelled(triton, 'dlm_requests_total{mode="diffusion",outcome="cancelled"}', time_out)


def test_http_unary_timeout_raises(clients):
    # Triton's /generate notices a client that has gone only when it writes, at the end: the request runs out there
    with pytest.raises(Timeout):
        clients["http"].generate(LONG, timeout=0.05, **SLOW)


@pytest.mark.parametrize("kind", [GrpcClient, HttpClient])
def test_no_server_raises_server_unavailable(kind):
    with kind(f"127.0.0.1:{free_port()}") as client, pytest.raises(ServerUnavailable):
        client.generate("1+1=")


def test_options_become_the_model_inputs():
    options = Options.of(mode="ar", max_tokens=8, threshold=0.5, seed=3, stop_words="\n")
    arrays = tensors("1+1=", options, stream=True)
    assert {name: a.dtype for name, a in arrays.items()} == {
        "text_input": np.object_, "mode": np.object_, "max_tokens": np.int32, "seed": np.uint64,
        "stop_words": np.object_, "threshold": np.float32, "stream": np.bool_,
    }
    assert arrays["stop_words"].tolist() == [b"\n"] and arrays["text_input"].shape == (1,)
    assert json_body("1+1=", options, stream=False) == {
        "text_input": "1+1=", "mode": "ar", "max_tokens": 8, "seed": 3, "stop_words": ["\n"], "threshold": 0.5,
        "stream": False,
    }
    with pytest.raises(TypeError, match="unknown option"):
        Options.of(top_n=3)
    sampling = tensors("1+1=", Options.of(top_k=3, top_p=0.5, return_log_probs=True, top_logprobs=2), stream=False)
    assert {name: a.dtype for name, a in sampling.items() if name not in ("text_input", "stream")} == {
        "top_k": np.int32, "top_p": np.float32, "return_log_probs": np.bool_, "top_logprobs": np.int32}
    out_of_int32 = r"^top_k must be in \[-2147483648, 2147483647\] \(int32\), got 4294967297$"
    with pytest.raises(InvalidRequest, match=out_of_int32):
        tensors("1+1=", Options.of(top_k=2**32 + 1), stream=False)  # numpy would send it as 1


@pytest.mark.parametrize("message, kind", [
    ("threshold must be in (0, 1], got 1.5", InvalidRequest),
    ("input 'text_input' is missing: send the prompt as BYTES", InvalidRequest),
    ("inference input 'max_tokens' data-type is 'INT64', but model 'dlm' expects 'INT32'", InvalidRequest),
    ("the queue is full (64 requests waiting, 16 running); retry later", ServerUnavailable),
    ("the server is shutting down and accepts no new requests", ServerUnavailable),
    ("the request was cancelled", Cancelled),
    ("the engine pass failed: boom", DLMError),
    ("sampling_parameters keys 'a', 'b' are unknown: expected some of temperature", InvalidRequest),
    ("min_length (2) and min_tokens (3) must agree: they are TensorRT-LLM's and vLLM's names", InvalidRequest),
    ("sampling_parameters 'max_tokens' (4) and input 'max_tokens' (8) must agree: they set the same thing",
     InvalidRequest),
])
def test_stream_errors_are_classified_by_their_wording(message, kind):
    error = from_grpc(message, None)
    assert type(error) is kind and str(error) == message
    assert type(from_grpc(message, "StatusCode.DEADLINE_EXCEEDED")) is Timeout
    assert type(from_http(message, 400)) is InvalidRequest and type(from_http(message, 503)) is ServerUnavailable


# --- log probs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_log_probs_come_with_the_text(clients, protocol, stream):
    client = clients[protocol]
    options = dict(mode="diffusion", max_tokens=48, top_logprobs=2)
    if stream:
        with client.generate_stream(LONG, **options) as blocks_stream:
            blocks = list(blocks_stream)
        result = blocks_stream.result
        assert len(blocks) >= 2 and all("".join(t.text for t in b.tokens) == b.text for b in blocks)
    else:
        result = client.generate(LONG, **options)
    assert result.text == ANSWER and result.tokens is not None
    assert b"".join(t.token for t in result.tokens) == ANSWER.encode()
    assert all(isinstance(t, Token) and t.logprob <= 0 and len(t.top_logprobs) == 2 for t in result.tokens)
    assert all(t.top_logprobs[0].token == t.token for t in result.tokens)  # greedy: the best candidate
    assert client.generate(LONG, mode="ar", max_tokens=4).tokens is None  # not asked for
    only = client.generate(LONG, mode="ar", max_tokens=4, return_log_probs=True)
    assert only.tokens is not None and [t.top_logprobs for t in only.tokens] == [()] * 4
    assert result.to_dict()["tokens"][0] == {"token": ANSWER[0], "bytes": [ord(ANSWER[0])],
                                             "logprob": result.tokens[0].logprob,
                                             "top_logprobs": [a.to_dict() for a in result.tokens[0].top_logprobs]}


def test_both_protocols_give_the_same_log_probs(clients):
    grpc, http = (clients[p].generate(LONG, mode="speculative", max_tokens=48, top_logprobs=3)
                  for p in ("grpc", "http"))
    assert grpc.tokens == http.tokens


def test_generate_json_forms_of_log_probs_are_read():
    """Triton's generate JSON writes a one-element tensor as a scalar, a [n, k] one flat, and BYTES as the raw bytes
    (seen from Triton 2.51), so half a UTF-8 character arrives as invalid UTF-8 and must come through exact."""
    body = (b'{"text_output":"\xe6\x97\xa5","num_forwards":2,"num_tokens":2,"output_log_probs":[-0.5,-0.25],'
            b'"output_tokens":["\xe6\x97","\xa5"],"output_top_log_probs":[-0.5,-1.0,-0.25,-2.0],'
            b'"output_top_tokens":["\xe6\x97","x\\"y","\xa5","\\n"]}')
    text, forwards, num_tokens, final, reason, tokens, cached = parse_event(exact_json(body), final=True)
    assert text == "日" and (forwards, num_tokens, final, reason, cached) == (2, 2, True, "", None)
    assert parse_event({"text_output": "", "num_cached_tokens": 17}, final=True)[6] == 17
    assert tokens == (
        Token(b"\xe6\x97", -0.5, (Alternative(b"\xe6\x97", -0.5), Alternative(b'x"y', -1.0))),
        Token(b"\xa5", -0.25, (Alternative(b"\xa5", -0.25), Alternative(b"\n", -2.0))),
    )
    assert tokens[0].text == "\ufffd"
    one = tokens_from(-0.5, "a", [-0.5, -1.0], ["a", "b"])  # one token: scalars
    assert one == (Token(b"a", -0.5, (Alternative(b"a", -0.5), Alternative(b"b", -1.0))),)
    assert tokens_from([], []) == () and tokens_from(-0.5, "a") == (Token(b"a", -0.5),)
    grpc_shaped = tokens_from(np.array([-0.5, -0.25], dtype=np.float32), np.array([b"a", b"b"], dtype=np.object_),
                              np.zeros((2, 1), dtype=np.float32), np.array([[b"a"], [b"c"]], dtype=np.object_))
    assert [t.top_logprobs[0].token for t in grpc_shaped] == [b"a", b"c"]
    with pytest.raises(DLMError, match="2 output_tokens but 1 output_log_probs"):
        tokens_from([-0.5], ["a", "b"])


# A byte-level tokenizer over the miniature's ids in which the upper-case letters the upper-casing task answers with
# stand for bytes of multi-byte UTF-8 characters (A-M lead bytes 0xC3-0xCF, N-Z continuation bytes 0x80-0x8C):
# the answer's tokens are then halves of characters, and invalid UTF-8 where two halves do not pair up.
SPLIT_BYTES = {chr(ord("A") + i): 0xC3 + i for i in range(13)} | {chr(ord("N") + i): 0x80 + i for i in range(13)}


@pytest.fixture(scope="module")
def byte_level_server(tmp_path_factory):
    """A server over the miniature with the byte-level tokenizer of SPLIT_BYTES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from conftest import MINIATURE
    from dlm.text import byte_level_alphabet
    from triton_server import repository_with, start_server

    directory = tmp_path_factory.mktemp("byte_level")
    miniature = json.loads((MINIATURE / "tokenizer.json").read_text())
    char_of = {b: c for c, b in byte_level_alphabet().items()}  # byte -> the byte-level BPE's character for it
    vocab, used = {}, set()
    for piece, token_id in miniature["model"]["vocab"].items():
        if len(piece) == 1:
            byte = SPLIT_BYTES.get(piece, ord(piece))
            vocab[char_of[byte]] = token_id
            used.add(byte)
    unused_ids = iter(sorted(set(range(128)) - set(vocab.values()) - {t["id"] for t in miniature["added_tokens"]}))
    for byte in sorted(set(range(256)) - used):  # every byte has a token: unused ids, then ids beyond the model's
        vocab[char_of[byte]] = next(unused_ids, len(vocab) + 1000)
    tokenizer = Tokenizer(models.BPE(vocab={**vocab, **{t["content"]: t["id"] for t in miniature["added_tokens"]}},
                                     merges=[]))
    tokenizer.add_special_tokens([t["content"] for t in miniature["added_tokens"] if t["special"]])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text((MINIATURE / "config.json").read_text())
    server = start_server(directory / "server.log", repository_with(directory / "repository", tokenizer=str(directory)))
    yield server
    server.stop()


def test_token_bytes_stay_exact_over_grpc_and_http_when_they_split_a_character(byte_level_server):
    answer = bytes(SPLIT_BYTES[c] for c in ANSWER)  # what the miniature answers, in this tokenizer's bytes
    options: dict[str, Any] = dict(mode="diffusion", max_tokens=48, top_logprobs=2)
    with GrpcClient(byte_level_server.grpc_url) as grpc, HttpClient(byte_level_server.http_url) as http:
        results = [grpc.generate(LONG, **options), http.generate(LONG, **options),
                   grpc.generate_stream(LONG, **options).drain(), http.generate_stream(LONG, **options).drain()]
    tokens = [r.tokens or [] for r in results]
    for result, its_tokens in zip(results, tokens):  # every path: the exact bytes, though most tokens are not UTF-8
        assert b"".join(t.token for t in its_tokens) == answer
        assert result.text == answer.decode("utf-8", errors="replace")
        assert [[a.token for a in t.top_logprobs] for t in its_tokens] == [
            [a.token for a in t.top_logprobs] for t in tokens[0]]  # alternatives too
    assert [t.logprob for t in tokens[0]] == pytest.approx([t.logprob for t in tokens[1]])



# --- issue 15's and issue 12's inputs ------------------------------------------------------------------------------
def test_new_options_become_the_model_inputs():
    options = Options.of(min_tokens=4, min_length=4, ignore_eos=True, exclude_input_in_output=False,
                         remask_threshold=0.5, max_remasks=2, sampling_parameters={"max_tokens": "16"})
    arrays = tensors("1+1=", options, stream=False)
    assert {name: a.dtype for name, a in arrays.items() if name not in ("text_input", "stream")} == {
        "min_tokens": np.int32, "min_length": np.int32, "ignore_eos": np.bool_, "exclude_input_in_output": np.bool_,
        "remask_threshold": np.float32, "max_remasks": np.int32, "sampling_parameters": np.object_}
    assert arrays["sampling_parameters"].tolist() == [b'{"max_tokens": "16"}']  # a dict is written as JSON
    body = json_body("1+1=", Options.of(sampling_parameters='{"top_k": 2}', ignore_eos=False), stream=True)
    assert body == {"text_input": "1+1=", "sampling_parameters": '{"top_k": 2}', "ignore_eos": False, "stream": True}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_min_tokens_ignore_eos_echo_and_sampling_parameters(clients, protocol, stream):
    client = clients[protocol]

    def run(**options: Any):
        return client.generate_stream(LONG, **options).drain() if stream else client.generate(LONG, **options)

    held = run(mode="ar", max_tokens=48, min_tokens=40)
    assert held.text.startswith(ANSWER) and held.num_tokens > 40  # its end token comes after 40 tokens
    full = run(mode="diffusion", max_tokens=44, ignore_eos=True)
    assert full.num_tokens == 44 and full.finish_reason == "length"
    echoed = run(mode="speculative", max_tokens=48, exclude_input_in_output=False)
    assert echoed.text == LONG + ANSWER
    vllm = run(sampling_parameters={"mode": "ar", "max_tokens": 6})
    assert vllm.text == ANSWER[:6] and vllm.finish_reason == "length"
    with pytest.raises(InvalidRequest, match=r"^sampling_parameters key 'n' is unknown"):
        run(sampling_parameters={"n": 2})
    with pytest.raises(InvalidRequest, match=r"^max_remasks must be in \[0, 2147483647\], got -1$"):
        run(max_remasks=-1)
