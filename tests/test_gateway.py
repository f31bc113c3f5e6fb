"""The OpenAI-compatible gateway (`python -m client.gateway`) in front of a real tritonserver, with the official
`openai` package as its client: completions and chat completions, streamed and not, give the text the gRPC client
gets for the same request at temperature 0; malformed bodies get OpenAI error objects with HTTP 400; the API key;
a client that disconnects cancels its Triton request."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from client import GrpcClient
from client.chat_template import ChatTemplate, TemplateError
from client.gateway import create_app
from export.tasks import held_out_set
from test_server import wait_for_metric
from triton_server import ENDLESS_PROMPT, ENDLESS_TOKENS

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
    assert prompt == PROBLEM.prompt  # the template's '=' ends it; its <s> is left to the server's tokenizer
    with pytest.raises(TemplateError, match="no system messages"):
        chat.render([{"role": "system", "content": "be brief"}])
    with TestClient(create_app(triton.grpc_url, tokenizer=tmp_path)) as client:
        messages = [{"role": "user", "content": [{"type": "text", "text": PROBLEM.prompt[:-1]}]}]
        response = client.post("/v1/chat/completions", json={"model": "dlm", "messages": messages, "max_tokens": 48})
        assert response.json()["choices"][0]["message"]["content"] == grpc.generate(prompt, max_tokens=48).text
        response = client.post("/v1/chat/completions",
                               json={"model": "dlm", "messages": [{"role": "system", "content": "be brief"}]})
        assert response.status_code == 400 and response.json()["error"]["message"] == "no system messages"


def test_a_client_that_disconnects_mid_stream_cancels_its_request(triton, gateway):
    before = triton.metrics().get(CANCELLED, 0.0)
    body = {"model": "dlm", "prompt": ENDLESS_PROMPT, "max_tokens": ENDLESS_TOKENS, "mode": "ar", "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[len("data: "):])["choices"][0]["text"]
    assert wait_for_metric(triton, CANCELLED, lambda v: v >= before + 1) == before + 1


def test_a_client_that_disconnects_before_the_answer_cancels_its_request(triton, grpc, gateway):
    slow = {"prompt": ENDLESS_PROMPT, "mode": "ar", "max_tokens": ENDLESS_TOKENS}
    assert grpc.generate(ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS).num_tokens == ENDLESS_TOKENS
    before = triton.metrics().get(CANCELLED, 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/completions", json={"model": "dlm", **slow}, timeout=0.1)
    assert wait_for_metric(triton, CANCELLED, lambda v: v >= before + 1) == before + 1


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
