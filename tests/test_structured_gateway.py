"""Structured outputs through the gateway and the Triton model's inputs: `response_format` mapped onto the guided
decoding inputs, the inputs parsed and checked, and a guided request on the shipped artifact (engine contract
version 2, exported without --structured) refused with the command that rebuilds it."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from client.gateway import ChatRequest
from dlm.inputs import Defaults, InvalidInput, Limits, parse_request

LIMITS = Limits(context=256, max_block_length=32)


def parse(**inputs):
    feeds = {"text_input": np.array([b"12+34="], dtype=object)}
    for name, value in inputs.items():
        feeds[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=object)
    return parse_request(feeds.get, Defaults(), LIMITS, 8)


def test_response_format_maps_onto_the_guided_decoding_inputs():
    messages: list = [{"role": "user", "content": "x"}]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    strict = ChatRequest(model="dlm", messages=messages,
                         response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                                 "strict": True}})
    assert strict.unsupported() is None
    options = strict.options()
    assert options["guided_decoding_guide_type"] == "json_schema"
    assert json.loads(options["guided_decoding_guide"]) == schema
    assert ChatRequest(model="dlm", messages=messages, response_format={"type": "json_object"}).options()[
        "guided_decoding_guide_type"] == "json"
    assert "guided_decoding_guide_type" not in ChatRequest(model="dlm", messages=messages,
                                                           response_format={"type": "text"}).options()


def test_the_guided_decoding_inputs_are_parsed_and_checked():
    parsed = parse(guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "object"}')
    assert parsed.guide == ("json_schema", '{"type": "object"}')
    assert parsed.params.mode == "diffusion"  # the default mode: every mode decodes under a grammar
    assert parse(guided_decoding_guide_type="json", mode="ar").params.mode == "ar"
    assert parse().guide is None and parse().params.mode == "diffusion"
    cases: list[tuple[dict[str, object], str]] = [
        ({"guided_decoding_guide_type": "ebnf", "guided_decoding_guide": "x"}, "expected one of json, json_schema"),
        ({"guided_decoding_guide_type": "regex"}, "needs input 'guided_decoding_guide'"),
        ({"guided_decoding_guide": "[a-z]+"}, "needs 'guided_decoding_guide_type'"),
        ({"guided_decoding_guide_type": "json", "ignore_eos": True}, "ignore_eos cannot"),
        ({"guided_decoding_guide_type": "json", "min_tokens": 40}, "min_tokens cannot"),
        ({"guided_decoding_guide_type": "json", "remask_threshold": 0.5}, "remask_threshold cannot"),
    ]
    for inputs, words in cases:
        with pytest.raises(InvalidInput, match=words):
            parse(**inputs)


@pytest.fixture(scope="module")
def client(gateway_process):
    with openai.OpenAI(base_url=f"{gateway_process.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_a_guided_request_on_a_version_2_artifact_is_refused_with_the_rebuild_command(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="dlm", messages=[{"role": "user", "content": "12+34="}], max_tokens=8,
                                       response_format={"type": "json_object"})
    message = str(caught.value)
    assert "engine contract version 2" in message and "--structured" in message
