"""Tool calls (client/tool_calls.py): the `<tool_call>{json}</tool_call>` (hermes) and `<TOOLCALL>[json, ...]
</TOOLCALL>` (NVIDIA's llama_nemotron_json) syntaxes parsed into OpenAI tool_calls, whole and streamed in any split;
the checks of `tools` / `tool_choice`; and the grammar of `tool_choice` "required" or a named function, which makes
even random weights of the real vocabulary answer with a call in every mode, in either syntax."""

from __future__ import annotations

import json
import re

import pytest

from client import tool_calls
from client.tool_calls import HERMES, NEMOTRON, ToolCallError, ToolCallStream, check_tools, parse, parser_for
from dlm.refine import GenerationParams, generate

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"], "properties": {"zone": {"enum": ["UTC"]}}}}}
TEMPLATE = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"  # renders tools, writes hermes calls

TEXT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>')
NEMOTRON_TEXT = ('Let me look.\n<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
                 '{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]</TOOLCALL>')


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("syntax, text", [(HERMES, TEXT), (NEMOTRON, NEMOTRON_TEXT)], ids=["hermes", "nemotron"])
def test_calls_are_parsed_out_of_the_text_with_arguments_as_a_json_string(syntax, text):
    content, calls = parse(syntax, text)
    assert content == "Let me look."
    assert calls_of(calls) == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert isinstance(calls[0]["function"]["arguments"], str)


@pytest.mark.parametrize("text, content, names", [
    ("no call here", "no call here", []),  # left exactly as it is
    ("  <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>  ", None, ["f"]),  # no content: None
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),  # not a call: content
    ("<tool_call>{\"arguments\": {}}</tool_call>", "<tool_call>{\"arguments\": {}}</tool_call>", []),  # no name
    ("a<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}", "a", ["f"]),  # cut off before the closing tag
    ("a<tool_call>{\"name\": \"f\", \"argu", "a<tool_call>{\"name\": \"f\", \"argu", []),  # cut mid-JSON
])
def test_what_is_and_is_not_a_call(text, content, names):
    parsed_content, calls = parse(HERMES, text)
    assert parsed_content == content
    assert [c["function"]["name"] for c in calls] == names


@pytest.mark.parametrize("what, text, content, names", [
    ("a list", '<TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>', None, ["f"]),
    ("not a list", '<TOOLCALL>{"name": "f", "arguments": {}}</TOOLCALL>',
     '<TOOLCALL>{"name": "f", "arguments": {}}</TOOLCALL>', []),
    ("an element that is no call", '<TOOLCALL>[{"name": "f"}, 3]</TOOLCALL>', '<TOOLCALL>[{"name": "f"}, 3]</TOOLCALL>',
     []),
    ("an empty list", "<TOOLCALL>[]</TOOLCALL>", "<TOOLCALL>[]</TOOLCALL>", []),
    ("cut off, whole", 'x <TOOLCALL>[{"name": "f"}, {"name": "g"}]', "x", ["f", "g"]),
])
def test_what_is_and_is_not_a_nemotron_call(what, text, content, names):
    parsed_content, calls = parse(NEMOTRON, text)
    assert parsed_content == content, what
    assert [c["function"]["name"] for c in calls] == names, what


@pytest.mark.parametrize("syntax, text", [
    (HERMES, TEXT), (HERMES, "plain <tool text> with < signs"),
    (HERMES, "x<tool_call>{\"name\": \"f\"}</tool_call>y<tool_call>bad</tool_call>z"),
    (HERMES, "a<tool_call>{\"name\": \"f\"}"), (NEMOTRON, NEMOTRON_TEXT), (NEMOTRON, "a <TOOL b <TOOLCALL>[1]</TOOLCALL>"),
])
def test_streamed_in_any_split_the_deltas_add_up_to_the_whole_parse(syntax, text):
    whole_content, whole_calls = parse(syntax, text)
    splits = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for pieces in splits:
        stream = ToolCallStream(syntax)
        content, calls = "", list[dict]()
        for piece in pieces:
            part, done = stream.feed(piece)
            content, calls = content + part, calls + done
        part, done = stream.feed("", final=True)
        content, calls = content + part, calls + done
        assert calls_of(calls) == calls_of(whole_calls), pieces
        assert [c["index"] for c in calls] == list(range(len(calls)))
        assert (content.strip() or None) == whole_content if whole_calls else content == text, pieces


def test_text_that_may_open_a_call_is_held_back_until_it_is_decided():
    stream = ToolCallStream(HERMES)
    assert stream.feed("Hi <tool_") == ("Hi ", [])
    assert stream.feed("box>") == ("<tool_box>", [])  # not a call after all: sent
    assert stream.feed("<tool_call>{\"name\": \"f\", \"arguments\": {}}") == ("", [])  # inside a call: held
    content, calls = stream.feed("</tool_call>")
    assert content == "" and calls_of(calls) == [("f", {})]


def test_the_parser_comes_from_the_template():
    assert parser_for(TEMPLATE) == HERMES
    assert parser_for("{{ tools }}<TOOLCALL>{{ calls }}</TOOLCALL>") == NEMOTRON
    assert parser_for("[TOOL_CALLS]{{ tools }}") is None and parser_for(None) is None
    assert parser_for(None, "hermes") == HERMES and parser_for(TEMPLATE, "llama_nemotron_json") == NEMOTRON


@pytest.mark.parametrize("tools, choice, parallel, source, param, words", [
    (None, "required", None, TEMPLATE, "tool_choice", "tool_choice needs tools"),
    (None, None, False, TEMPLATE, "parallel_tool_calls", "parallel_tool_calls needs tools"),
    ([{"type": "code_interpreter"}], None, None, TEMPLATE, "tools", "tools[0] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], None, None, TEMPLATE, "tools", "1 to 64 letters"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, None, TEMPLATE, "tools",
     "must be a JSON schema"),
    ([WEATHER], None, None, "no tools here", "tools", "does not render tools"),
    ([WEATHER], None, None, "[TOOL_CALLS]{{ tools }}", "tools", "Mistral's [TOOL_CALLS]"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None, TEMPLATE, "tool_choice",
     "'get_time', which is not in tools"),
    ([WEATHER], "sometimes", None, TEMPLATE, "tool_choice", "must be \"none\", \"auto\", \"required\""),
])
def test_tools_and_tool_choice_that_cannot_be_honoured_are_refused(tools, choice, parallel, source, param, words):
    with pytest.raises(ToolCallError, match=re.escape(words)) as caught:
        check_tools(tools, choice, parallel, parser_for(source), source)
    assert caught.value.param == param


def test_tools_that_can_be_honoured_pass():
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
        check_tools([WEATHER, TIME], choice, True, HERMES, TEMPLATE)
    assert tool_calls.enforced("required") and tool_calls.enforced({"type": "function", "function": {"name": "f"}})
    assert not tool_calls.enforced("auto") and not tool_calls.enforced(None) and not tool_calls.enforced("none")


@pytest.fixture(scope="module")
def real_vocabulary(tmp_path_factory):
    from test_structured_decoding import build_real_vocabulary

    return build_real_vocabulary(tmp_path_factory.mktemp("real_vocab"))


@pytest.mark.slow
@pytest.mark.parametrize("syntax, choice, parallel, names", [
    (HERMES, "required", False, {"get_weather", "get_time"}),
    (HERMES, {"type": "function", "function": {"name": "get_weather"}}, False, {"get_weather"}),
    (HERMES, "required", True, {"get_weather", "get_time"}),
    (NEMOTRON, "required", False, {"get_weather", "get_time"}),
    (NEMOTRON, {"type": "function", "function": {"name": "get_time"}}, True, {"get_time"}),
], ids=["hermes-required", "hermes-named", "hermes-parallel", "nemotron-required", "nemotron-named-parallel"])
def test_the_grammar_makes_random_weights_call_a_tool_in_every_mode(real_vocabulary, syntax, choice, parallel, names):
    runtime, spec, compiler, codec = real_vocabulary
    grammar = compiler.compile("lark", tool_calls.grammar(syntax, [WEATHER, TIME], choice, parallel))
    prompt = codec.encode("What is the weather in Paris?")
    outputs = {}
    for mode in ("ar", "speculative", "diffusion"):
        result = generate(runtime, [prompt], GenerationParams(mode, 96, guide=grammar), spec)[0]
        text = codec.decode(result.tokens)
        content, calls = parse(syntax, text)
        assert calls, (mode, text)
        if not parallel:
            assert len(calls) == 1, (mode, text)
        assert content is None, (mode, text)
        if not parallel or result.finish_reason == "eos":
            assert result.finish_reason == "eos", (mode, text)  # the grammar ends after the call(s)
        for name, arguments in calls_of(calls):
            assert name in names
            if name == "get_weather":
                assert arguments["city"] in ("Paris", "Oslo") and arguments["unit"] in ("C", "F")
            else:
                assert arguments == {"zone": "UTC"}
        outputs[mode] = result.tokens
    assert outputs["ar"] == outputs["speculative"]
    unconstrained = codec.decode(generate(runtime, [prompt], GenerationParams("ar", 16), spec)[0].tokens)
    assert parse(syntax, unconstrained)[1] == []  # the grammar did the work, not the weights
