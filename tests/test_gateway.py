"""The OpenAI-compatible gateway (`python -m client.gateway`) in front of a real tritonserver, with the official
`openai` package as its client: completions and chat completions, streamed and not, give the text the gRPC client
gets for the same request at temperature 0; malformed bodies get OpenAI error objects with HTTP 400; the API key;
a client that disconnects cancels its Triton request."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from client import GrpcClient
from client.chat_template import ChatTemplate, TemplateError
from client.gateway import create_app
from export.tasks import held_out_set
from triton_server import ENDLESS_PROMPT, ENDLESS_TOKENS, given_up_until_cancelled

MODES = ["ar", "diffusion", "speculative"]
PROBLEM = held_out_set("upper", 3)[2]
CANCELLED = 'dlm_requests_total{mode="ar",outcome="cancelled"}'


@pytest.fixture(scope="module")
def gateway(gateway_process) -> str:
    """The base URL of `python -m client.gateway`, the session's child process in front of the session's server."""
    return gateway_process.url


@pytest.fixture(scope="module")
def openai_client(gateway):
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc(triton):
    with GrpcClient(triton.grpc_url) as client:
        yield client


def test_models_lists_the_served_model(openai_client):
    assert [m.id for m in openai_client.models.list()] == ["dlm"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("mode", MODES)
def test_completions_give_the_grpc_client_text(openai_client, grpc, mode, stream):
    expected = grpc.generate(PROBLEM.prompt, mode=mode, max_tokens=48, temperature=0.0)
    assert expected.text == PROBLEM.answer
    request = dict(model="dlm", prompt=PROBLEM.prompt, max_tokens=48, temperature=0, extra_body={"mode": mode})
    if stream:
        chunks = list(openai_client.completions.create(**request, stream=True,
                                                       stream_options={"include_usage": True}))
        choices = [c.choices[0] for c in chunks if c.choices]
        text, finish_reason, usage = "".join(c.text for c in choices), choices[-1].finish_reason, chunks[-1].usage
        assert len(choices) >= 3 and all(c.finish_reason is None for c in choices[:-1])
    else:
        completion = openai_client.completions.create(**request)
        assert completion.object == "text_completion" and completion.model == "dlm"
        text, finish_reason, usage = completion.choices[0].text, completion.choices[0].finish_reason, completion.usage
    assert text == expected.text and finish_reason == "stop"
    assert usage is not None and usage.completion_tokens == expected.num_tokens
    assert usage.prompt_tokens == len(PROBLEM.prompt) + 1  # a character tokenizer, plus <s>
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_chat_completions_give_the_grpc_client_text(openai_client, grpc, stream):
    controls = {"mode": "diffusion", "threshold": 0.7, "block_length": 16}
    expected = grpc.generate(PROBLEM.prompt, max_tokens=48, temperature=0.0, **controls)
    request = dict(model="dlm", messages=[{"role": "user", "content": PROBLEM.prompt}], max_tokens=48,
                   temperature=0, extra_body=controls)
    if stream:
        chunks = list(openai_client.chat.completions.create(**request, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        completion = openai_client.chat.completions.create(**request)
        assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
        text, finish_reason = completion.choices[0].message.content, completion.choices[0].finish_reason
        assert completion.usage is not None and completion.usage.completion_tokens == expected.num_tokens
    assert text == expected.text == PROBLEM.answer and finish_reason == "stop"


def test_max_tokens_reached_is_finish_reason_length(openai_client):
    completion = openai_client.completions.create(model="dlm", prompt=PROBLEM.prompt, max_tokens=5,
                                                  extra_body={"mode": "ar"})
    assert completion.choices[0].text == PROBLEM.answer[:5] and completion.choices[0].finish_reason == "length"


def test_a_list_of_prompts_is_answered_as_one_choice_each_in_order(openai_client, grpc):
    """OpenAI's `prompt` as a list: one choice per prompt, `index` its place in the list, each the text gRPC gives
    for that prompt alone, the usage summed over them; a list streamed is refused (one prompt per stream)."""
    problems = held_out_set("upper", 3)
    prompts = [problems[1].prompt, "57+8=", problems[0].prompt]
    expected = [grpc.generate(p, mode="ar", max_tokens=64, temperature=0.0) for p in prompts]
    assert len({e.text for e in expected}) == 3  # three different answers: a mix-up cannot pass
    completion = openai_client.completions.create(model="dlm", prompt=prompts, max_tokens=64, temperature=0,
                                                  extra_body={"mode": "ar"})
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.text for c in completion.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in completion.choices] == [e.finish_reason for e in expected] == ["stop"] * 3
    assert completion.usage is not None
    assert completion.usage.completion_tokens == sum(e.num_tokens for e in expected)
    single = openai_client.completions.create(model="dlm", prompt=prompts[1], max_tokens=64, temperature=0,
                                              extra_body={"mode": "ar"})
    assert single.usage is not None and completion.usage.prompt_tokens > single.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="a streamed completion takes exactly one prompt"):
        openai_client.completions.create(model="dlm", prompt=prompts, max_tokens=4, stream=True)


@pytest.mark.parametrize("path, body, message", [
    ("completions", '{"model": "dlm"}', r"^invalid request body: prompt: Field required$"),
    ("completions", '{"model": "dlm", "prompt": ', r"^the body is not valid JSON"),
    ("completions", '{"model": "dlm", "prompt": "1+1=", "max_tokens": "many"}', r"^invalid request body: max_tokens"),
    ("completions", '{"model": "dlm", "prompt": "1+1=", "threshold": 1.5}', r"^threshold must be in \(0, 1\], got 1.5$"),
    ("completions", '{"model": "dlm", "prompt": "1+1=", "stream": true, "mode": "fast"}',
     r"^mode 'fast' is unknown: expected one of ar, diffusion, speculative$"),
    ("completions", '{"model": "dlm", "prompt": "1+1=", "n": 2}', r"^only n = 1 is supported$"),
    ("chat/completions", '{"model": "dlm", "messages": []}', r"^invalid request body: messages"),
    ("chat/completions", '{"model": "dlm", "messages": [{"role": "robot", "content": "hi"}]}',
     r"^invalid request body: messages\.0\.role"),
    ("chat/completions", '["model", "dlm"]', r"^invalid request body"),
])
def test_malformed_bodies_get_openai_errors_with_400(gateway, path, body, message):
    response = httpx.post(f"{gateway}/v1/{path}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error


def test_the_openai_package_raises_the_server_message(openai_client):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model="dlm", prompt="1+1=", extra_body={"steps": 0})
    body = raised.value.body
    assert raised.value.status_code == 400 and isinstance(body, dict)
    assert body["message"] == "steps must be in [1, 32], got 0"
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="gpt-4", prompt="1+1=")


def test_api_key_is_required_when_set(triton):
    with TestClient(create_app(triton.grpc_url, api_key="secret")) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        response = client.post("/v1/completions", headers={"Authorization": "Bearer secret"},
                               json={"model": "dlm", "prompt": "4821+377=", "max_tokens": 8})
        assert response.status_code == 200 and response.json()["choices"][0]["text"]


def test_the_checkpoint_chat_template_makes_the_prompt(triton, grpc, tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}={% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": template}))
    chat = ChatTemplate.from_directory(tmp_path)
    prompt = chat.render([{"role": "user", "content": PROBLEM.prompt[:-1]}])
    assert prompt == "<s>" + PROBLEM.prompt  # the template writes the BOS; its '=' ends the prompt
    with pytest.raises(TemplateError, match="no system messages"):
        chat.render([{"role": "system", "content": "be brief"}])
    with TestClient(create_app(triton.grpc_url, tokenizer=tmp_path)) as client:
        messages = [{"role": "user", "content": [{"type": "text", "text": PROBLEM.prompt[:-1]}]}]
        response = client.post("/v1/chat/completions", json={"model": "dlm", "messages": messages, "max_tokens": 48})
        # sent with add_special_tokens false: one BOS (the template's), the ids a plain completion prompt gets
        answer = response.json()["choices"][0]["message"]["content"]
        assert answer == grpc.generate(prompt, max_tokens=48, add_special_tokens=False).text
        assert answer == grpc.generate(PROBLEM.prompt, max_tokens=48).text
        response = client.post("/v1/chat/completions",
                               json={"model": "dlm", "messages": [{"role": "system", "content": "be brief"}]})
        assert response.status_code == 400 and response.json()["error"]["message"] == "no system messages"


def test_a_client_that_disconnects_mid_stream_cancels_its_request(triton, gateway):
    body = {"model": "dlm", "prompt": ENDLESS_PROMPT, "max_tokens": ENDLESS_TOKENS, "mode": "ar", "stream": True}

    def disconnect() -> str:
        with httpx.stream("POST", f"{gateway}/v1/completions", json=body) as response:
            return next(line for line in response.iter_lines() if line.startswith("data: "))

    first = given_up_until_cancelled(triton, CANCELLED, disconnect)
    assert json.loads(first[len("data: "):])["choices"][0]["text"]


def test_a_client_that_disconnects_before_the_answer_cancels_its_request(triton, grpc, gateway):
    # 900 tokens of ar (seconds): the request is surely still being decoded when the client goes
    slow = {"prompt": ENDLESS_PROMPT, "mode": "ar", "max_tokens": 900, "ignore_eos": True}
    body = json.dumps({"model": "dlm", **slow}).encode()
    address = urllib.parse.urlsplit(gateway)

    def disconnect() -> None:
        with socket.create_connection((address.hostname, address.port)) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            # the request reached Triton and is being decoded; then the client closes the connection, unanswered
            deadline = time.monotonic() + 60
            while triton.metrics().get("dlm_live_slots", 0.0) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert triton.metrics().get("dlm_live_slots", 0.0) >= 1

    given_up_until_cancelled(triton, CANCELLED, disconnect)


def test_a_body_beyond_the_limit_is_refused_with_413(gateway):
    big = json.dumps({"model": "dlm", "prompt": "7" * (2 << 20)}).encode()  # the gateway's limit is 1 MiB
    declared = httpx.post(f"{gateway}/v1/completions", content=big, headers={"Content-Type": "application/json"})
    streamed = httpx.post(f"{gateway}/v1/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                          headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["message"] == "the request body exceeds 1048576 bytes"
    ok = httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", "prompt": "57+8=", "max_tokens": 4})
    assert ok.status_code == 200


# --- sampling controls and log probs ------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_completions_logprobs(openai_client, grpc, stream):
    expected = grpc.generate(PROBLEM.prompt, mode="diffusion", max_tokens=48, top_logprobs=2)
    request = dict(model="dlm", prompt=PROBLEM.prompt, max_tokens=48, temperature=0, logprobs=2,
                   extra_body={"mode": "diffusion"})
    if stream:
        chunks = [c.choices[0] for c in openai_client.completions.create(**request, stream=True) if c.choices]
        with_tokens = [c for c in chunks if c.logprobs and c.logprobs.tokens]
        assert len(with_tokens) >= 2 and all("".join(c.logprobs.tokens) == c.text for c in with_tokens)
        text = "".join(c.text for c in chunks)
        tokens = [t for c in with_tokens for t in c.logprobs.tokens]
        token_logprobs = [lp for c in with_tokens for lp in c.logprobs.token_logprobs]
        top = [d for c in with_tokens for d in c.logprobs.top_logprobs]
        offsets = [o for c in with_tokens for o in c.logprobs.text_offset]
    else:
        choice = openai_client.completions.create(**request).choices[0]
        text, logprobs = choice.text, choice.logprobs
        tokens, token_logprobs, top, offsets = (logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                                logprobs.text_offset)
    assert expected.tokens is not None and text == expected.text == PROBLEM.answer
    assert tokens == [t.text for t in expected.tokens] and "".join(tokens) == text
    assert token_logprobs == pytest.approx([t.logprob for t in expected.tokens])
    assert top == [{a.text: pytest.approx(a.logprob) for a in t.top_logprobs} for t in expected.tokens]
    assert offsets == list(range(len(text)))  # one character per token in the miniature's tokenizer


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_chat_logprobs(openai_client, grpc, stream):
    expected = grpc.generate(PROBLEM.prompt, mode="speculative", max_tokens=48, top_logprobs=3)
    request = dict(model="dlm", messages=[{"role": "user", "content": PROBLEM.prompt}], max_tokens=48, temperature=0,
                   logprobs=True, top_logprobs=3, extra_body={"mode": "speculative"})
    if stream:
        chunks = list(openai_client.chat.completions.create(**request, stream=True))
        assert chunks[0].choices[0].logprobs is None  # the role chunk
        with_tokens = [c.choices[0] for c in chunks if c.choices[0].logprobs]
        assert all("".join(e.token for e in c.logprobs.content) == c.delta.content for c in with_tokens)
        content = [e for c in with_tokens for e in c.logprobs.content]
    else:
        choice = openai_client.chat.completions.create(**request).choices[0]
        assert choice.message.content == PROBLEM.answer
        content = choice.logprobs.content
    assert expected.tokens is not None
    assert [(e.token, e.bytes) for e in content] == [(t.text, list(t.token)) for t in expected.tokens]
    assert [e.logprob for e in content] == pytest.approx([t.logprob for t in expected.tokens])
    for entry, token in zip(content, expected.tokens):
        assert [(a.token, a.bytes) for a in entry.top_logprobs] == [(a.text, list(a.token)) for a in token.top_logprobs]
    plain = openai_client.chat.completions.create(**{**request, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    bare = openai_client.chat.completions.create(**{**request, "top_logprobs": None})
    assert bare.choices[0].logprobs.content and all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_top_p_and_top_k_are_honoured(openai_client, grpc):
    greedy = grpc.generate(ENDLESS_PROMPT, mode="ar", max_tokens=16).text
    request = dict(model="dlm", prompt=ENDLESS_PROMPT, max_tokens=16, temperature=1.5)
    assert openai_client.completions.create(**request, top_p=1e-6, extra_body={"mode": "ar"}).choices[0].text == greedy
    assert openai_client.completions.create(**request, extra_body={"mode": "ar", "top_k": 1}).choices[0].text == greedy
    seeded = [openai_client.completions.create(**request, seed=3, extra_body={"mode": "ar", "top_k": -1})
              .choices[0].text for _ in range(2)]  # vLLM's -1: not set
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("path, body, message", [
    ("completions", {"prompt": "1+1=", "logprobs": 21}, r"^logprobs must be in \[0, 20\], got 21$"),
    ("completions", {"prompt": "1+1=", "logprobs": -1}, r"^logprobs must be in \[0, 20\], got -1$"),
    ("chat/completions", {"messages": [{"role": "user", "content": "1+1="}], "logprobs": True, "top_logprobs": 21},
     r"^top_logprobs must be in \[0, 20\], got 21$"),
    ("chat/completions", {"messages": [{"role": "user", "content": "1+1="}], "top_logprobs": 2},
     r"^top_logprobs needs logprobs: true$"),
    ("completions", {"prompt": "1+1=", "top_p": 0}, r"^top_p must be in \(0, 1\], got 0.0$"),
    ("completions", {"prompt": "1+1=", "top_p": 1.0000000000000004}, r"^top_p must be in \(0, 1\], got 1.0000000"),
    ("chat/completions", {"messages": [{"role": "user", "content": "1+1="}], "top_p": 1.5, "stream": True},
     r"^top_p must be in \(0, 1\], got 1.5$"),
    # beyond what an INT32 input holds: refused before it is sent
    ("completions", {"prompt": "1+1=", "top_k": 2**40, "stream": True}, r"^top_k must be in \[-2147483648, "),
    # beyond the engine's K: refused by the server, its message passed through
    ("completions", {"prompt": "1+1=", "top_k": 100}, r"^top_k must be in \[1, 64\], got 100$"),
    ("chat/completions", {"messages": [{"role": "user", "content": "1+1="}], "top_k": 65, "stream": True},
     r"^top_k must be in \[1, 64\], got 65$"),
])
def test_out_of_range_sampling_and_logprobs_get_400_naming_them(gateway, path, body, message):
    response = httpx.post(f"{gateway}/v1/{path}", json={"model": "dlm", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and re.search(message, error["message"]), error


# --- issue 15: what AIPerf and vLLM's clients send; issue 12's controls -------------------------------------------
def test_min_tokens_and_ignore_eos_are_honoured(openai_client, grpc):
    short = "4821+377="
    plain = openai_client.completions.create(model="dlm", prompt=short, max_tokens=24, extra_body={"mode": "ar"})
    assert plain.usage is not None and plain.usage.completion_tokens < 10 and plain.choices[0].finish_reason == "stop"
    held = openai_client.completions.create(model="dlm", prompt=short, max_tokens=24,
                                            extra_body={"mode": "ar", "min_tokens": 10})
    assert held.usage is not None and held.usage.completion_tokens > 10
    assert held.choices[0].text == grpc.generate(short, mode="ar", max_tokens=24, min_tokens=10).text
    for stream in (False, True):
        request = dict(model="dlm", messages=[{"role": "user", "content": short}], max_tokens=20,
                       extra_body={"ignore_eos": True, "mode": "diffusion"})
        if stream:
            chunks = list(openai_client.chat.completions.create(**request, stream=True,
                                                                stream_options={"include_usage": True}))
            usage, reason = chunks[-1].usage, [c for c in chunks if c.choices][-1].choices[0].finish_reason
        else:
            completion = openai_client.chat.completions.create(**request)
            usage, reason = completion.usage, completion.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == 20 and reason == "length"


def sse_chunks(response: httpx.Response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(gateway, path):
    body: dict = {"model": "dlm", "max_tokens": 48, "stream": True, "mode": "diffusion", "block_length": 8,
                  "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": PROBLEM.prompt} if path == "completions" else
                {"messages": [{"role": "user", "content": PROBLEM.prompt}]})
    chunks = sse_chunks(httpx.post(f"{gateway}/v1/{path}", json=body, timeout=60))
    assert len(chunks) >= 4 and all("usage" in c for c in chunks)
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion) and completion[-1] == len(PROBLEM.answer) + 1  # the end token counted
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {len(PROBLEM.prompt) + 1}
    assert chunks[-1]["choices"] == []  # include_usage's own chunk comes last
    plain = sse_chunks(httpx.post(f"{gateway}/v1/{path}", json={**body, "stream_options": {"include_usage": True}},
                                  timeout=60))
    assert [c for c in plain if "usage" in c] == [plain[-1]]  # without it: only the last chunk


def test_remasking_and_the_pass_cap_ride_along(openai_client, grpc):
    request = dict(model="dlm", prompt="4821+377=", max_tokens=64)
    controls = {"mode": "diffusion", "ignore_eos": True, "threshold": 0.9}
    for extra in ({"remask_threshold": 0.9}, {"remask_threshold": 0.9, "max_remasks": 0},
                  {"threshold": 0.999, "steps": 2, "block_length": 8}):
        expected = grpc.generate("4821+377=", max_tokens=64, **{**controls, **extra})
        completion = openai_client.completions.create(**request, extra_body={**controls, **extra})
        assert completion.choices[0].text == expected.text
        assert completion.model_extra is not None
        assert completion.model_extra["dlm"]["num_forwards"] == expected.num_forwards
    capped = grpc.generate("4821+377=", max_tokens=64, **{**controls, "threshold": 0.999, "steps": 2,
                                                          "block_length": 8})
    assert capped.num_forwards <= 1 + 8 * 3  # 8 blocks of at most 2 denoising passes and the pass that writes it


@pytest.mark.parametrize("body, message", [
    ({"min_tokens": 9, "max_tokens": 8}, r"^min_tokens must be in \[0, 8\] \(at most max_tokens\), got 9$"),
    ({"min_tokens": -1}, r"^min_tokens must be in \[0, 64\] \(at most max_tokens\), got -1$"),
    ({"remask_threshold": 1.0}, r"^remask_threshold must be in \(0, 1\), got 1.0$"),
    ({"remask_threshold": 1e-60, "stream": True}, r"^remask_threshold must be in \(0, 1\), got 0.0$"),  # as FP32
    ({"max_remasks": -2, "stream": True}, r"^max_remasks must be in \[0, 2147483647\], got -2$"),
    ({"ignore_eos": "sometimes"}, r"^invalid request body: ignore_eos"),
])
def test_out_of_range_new_fields_get_400_naming_them(gateway, body, message):
    response = httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", "prompt": "1+1=", **body})
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"]), response.text


def scrape(gateway: str) -> dict[str, float]:
    response = httpx.get(f"{gateway}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines() if line and not line.startswith("#")}


def test_metrics_count_requests_errors_latency_and_tokens(gateway):
    ok, bad = ('dlm_gateway_requests_total{endpoint="/v1/completions",status="200"}',
               'dlm_gateway_requests_total{endpoint="/v1/completions",status="400"}')
    error, too_large = ('dlm_gateway_errors_total{endpoint="/v1/completions",status="400"}',
                        'dlm_gateway_errors_total{endpoint="/v1/chat/completions",status="413"}')
    count = 'dlm_gateway_request_duration_seconds_count{endpoint="/v1/completions"}'
    first = 'dlm_gateway_time_to_first_token_seconds_count{endpoint="/v1/completions"}'
    prompt, completion = ('dlm_gateway_prompt_tokens_total{endpoint="/v1/completions"}',
                          'dlm_gateway_completion_tokens_total{endpoint="/v1/completions"}')
    before = scrape(gateway)
    answer = httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", "prompt": PROBLEM.prompt, "max_tokens": 48},
                        timeout=60).json()
    streamed = httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", "prompt": PROBLEM.prompt, "max_tokens": 8,
                                                             "stream": True}, timeout=60)
    assert streamed.status_code == 200
    assert httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", "prompt": "1+1=", "steps": 0}).status_code == 400
    huge = json.dumps({"model": "dlm", "messages": [{"role": "user", "content": "7" * (2 << 20)}]}).encode()
    assert httpx.post(f"{gateway}/v1/chat/completions", content=huge).status_code == 413
    after = scrape(gateway)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew(ok) == 2 and grew(bad) == 1 and grew(error) == 1 and grew(too_large) == 1
    assert grew(count) == 3 and grew(first) == 1
    usage = answer["usage"]
    assert grew(prompt) == 2 * usage["prompt_tokens"]
    assert grew(completion) == usage["completion_tokens"] + 8  # the stream stopped at max_tokens
    bucket = 'dlm_gateway_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'
    assert after[bucket] == after[count] and after['dlm_gateway_requests_in_flight'] >= 1  # this scrape itself
    # the model-server gauges of the Triton beside it (client/replica_gauges.py; their meaning: test_replica_protocol)
    assert after["dlm_gateway_triton_metrics_up"] == 1 and "dlm:num_requests_waiting" in after


def test_log_probs_json_cannot_hold_or_a_grammar_excluded_are_written_as_vllm_floors_them():
    from client.openai_logprobs import CompletionLogprobs, chat_logprobs
    from client.result import Alternative, Token

    excluded = Alternative(b"x", -1e30)  # a candidate the grammar masked out in the graph
    token = Token(b"a", -0.5, top_logprobs=(Alternative(b"a", -0.5), excluded, Alternative(b"y", float("-inf"))))
    chat = chat_logprobs([token])["content"][0]
    assert chat["logprob"] == -0.5 and [a["logprob"] for a in chat["top_logprobs"]] == [-0.5, -9999.0, -9999.0]
    completion = CompletionLogprobs().chunk([token])
    assert completion["top_logprobs"] == [{"a": -0.5, "x": -9999.0, "y": -9999.0}]
