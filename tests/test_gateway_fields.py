"""No OpenAI field is silently ignored: every field the gateway does not honour is refused with a 400 that names it
(one test per field, on the endpoint that defines it, sent by the `openai` package as a user's code sends it), the
values that ask for nothing are accepted, and so are identifiers and hints."""

from __future__ import annotations

from typing import Any

import openai
import pytest

REFUSED = [  # (endpoint, field, a value that asks for something, words of the message)
    ("chat", "response_format", {"type": "xml"}, "expected text, json_object or json_schema"),  # json: honoured
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "schema"),
    # honoured where the chat template renders tools; the miniature has no chat template
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "does not render tools"),
    ("chat", "tool_choice", "required", "tool_choice needs tools"),
    ("chat", "parallel_tool_calls", False, "parallel_tool_calls needs tools"),
    ("completions", "tools", [{"type": "function", "function": {"name": "f"}}], "unknown field 'tools'"),
    ("chat", "functions", [{"name": "f", "parameters": {}}], "functions"),
    ("chat", "function_call", "auto", "function_call"),
    ("chat", "logit_bias", {"1097": 5}, "logit_bias"),
    ("completions", "logit_bias", {"1097": 5}, "logit_bias"),
    ("chat", "frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2]"),  # honoured, within OpenAI's range
    ("completions", "presence_penalty", -3, "presence_penalty must be in [-2, 2]"),
    ("completions", "repetition_penalty", 0, "repetition_penalty must be in (0, 2]"),
    ("chat", "store", True, "store"),
    ("chat", "service_tier", "flex", "service_tier"),
    ("chat", "modalities", ["text", "audio"], "modality"),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("chat", "prediction", {"type": "content", "content": "x"}, "prediction"),
    ("chat", "reasoning_effort", "high", "chat_template_kwargs"),
    ("chat", "web_search_options", {}, "web_search_options"),
    ("chat", "verbosity", "low", "verbosity"),
    ("chat", "n", 2, "n = 1"),
    ("completions", "n", 2, "n = 1"),
    ("completions", "echo", True, "echo"),
    ("completions", "best_of", 2, "best_of"),
    ("completions", "suffix", "!", "suffix"),
    ("chat", "no_such_field", 1, "unknown field 'no_such_field'"),
    ("completions", "guided_json", {"type": "object"}, "unknown field 'guided_json'"),
]
ACCEPTED = [  # values that ask for nothing, identifiers and hints
    ("chat", {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"},
              "tools": [], "tool_choice": "none", "store": False, "service_tier": "auto", "modalities": ["text"]}),
    ("chat", {"user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k", "metadata": {"a": "b"}}),
    ("completions", {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "echo": False, "best_of": 1,
                     "user": "u-1"}),
    ("chat", {"chat_template_kwargs": {"enable_thinking": False}, "documents": [{"title": "t", "text": "x"}]}),
    ("chat", {"frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2}),  # honoured
    ("completions", {"frequency_penalty": 2, "presence_penalty": 2, "repetition_penalty": 2}),
]


@pytest.fixture(scope="module")
def client(gateway_process):
    with openai.OpenAI(base_url=f"{gateway_process.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def send(client: openai.OpenAI, endpoint: str, fields: dict) -> Any:
    if endpoint == "chat":
        return client.chat.completions.create(model="dlm", messages=[{"role": "user", "content": "12+34="}],
                                              max_tokens=4, extra_body=fields)
    return client.completions.create(model="dlm", prompt="12+34=", max_tokens=4, extra_body=fields)


@pytest.mark.parametrize("endpoint, field, value, words", REFUSED,
                         ids=[f"{e}-{f}-{i}" for i, (e, f, _, _) in enumerate(REFUSED)])
def test_a_field_not_honoured_is_refused_by_name(client, endpoint, field, value, words):
    with pytest.raises(openai.BadRequestError) as caught:
        send(client, endpoint, {field: value})
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == field, error
    assert words in error["message"], error["message"]


@pytest.mark.parametrize("endpoint, fields", ACCEPTED)
def test_fields_that_ask_for_nothing_are_accepted(client, endpoint, fields):
    answer = send(client, endpoint, fields)
    assert answer.usage is not None and answer.usage.completion_tokens >= 1


def test_chat_template_kwargs_may_not_replace_the_messages(client):
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs may not set messages"):
        send(client, "chat", {"chat_template_kwargs": {"messages": []}})
