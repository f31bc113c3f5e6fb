"""OpenAI tool calls over a checkpoint's own tool-call syntax: the request's `tools` and `tool_choice` checked, the
grammar that enforces `tool_choice` "required" or a named function, and the model's text parsed into `tool_calls`
(whole, or as streamed deltas).

The syntax is the one the chat template writes for an assistant's tool calls, as vLLM's `hermes` tool parser reads
it (the instruct family's template, Qwen's, Hermes'): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
element per call, optionally with a newline inside the tags. Mistral's `[TOOL_CALLS]` is a special token that the
server leaves out of the text, so a template that writes it is refused by name rather than parsed wrongly.

Enforcement compiles to a Lark grammar (llguidance's, with the call object as an inline `%json` schema: `name` the
function's, `arguments` its `parameters`), sent as the guided decoding inputs: the model writes one call (or several
when `parallel_tool_calls` allows) and then only its end token can follow.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
PARSERS = ("auto", "hermes")
USES_TOOLS = re.compile(r"\{[{%][^}]*\btools\b")  # a template statement or expression that reads `tools`


class ToolCallError(ValueError):
    """A `tools` / `tool_choice` the gateway cannot honour; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parser_for(template_source: str | None, choice: str = "auto") -> str | None:
    """The tool-call syntax of a chat template: `hermes`, or None when it writes none this gateway reads. `choice`
    (the gateway's --tool-call-parser) other than auto is taken as it is."""
    if choice != "auto":
        return choice
    if template_source and OPEN in template_source:
        return "hermes"
    return None


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None,
                parser: str | None, template_source: str | None) -> None:
    """Raises ToolCallError for tools or a tool_choice that cannot be honoured."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ToolCallError("tool_choice", "tool_choice needs tools")
    if parallel_tool_calls is not None and not tools:
        raise ToolCallError("parallel_tool_calls", "parallel_tool_calls needs tools")
    if not tools:
        return
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolCallError("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                         f"\"parameters\", ...}}}}")
        if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", function["name"]):
            raise ToolCallError("tools", f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolCallError("tools", f"tools[{i}].function.parameters must be a JSON schema (an object)")
    if template_source is None or not USES_TOOLS.search(template_source):
        raise ToolCallError("tools", "this checkpoint's chat template does not render tools, so the model would "
                                     "never see them")
    if parser is None:
        syntax = " (Mistral's [TOOL_CALLS], a special token the server leaves out of the text)" \
            if "[TOOL_CALLS]" in template_source else ""
        raise ToolCallError("tools", f"this checkpoint's chat template writes tool calls in a syntax this gateway "
                                     f"does not parse{syntax}; supported: <tool_call>{{json}}</tool_call> "
                                     f"(--tool-call-parser hermes)")
    named = named_function(tool_choice)
    if named is not None and named not in {t["function"]["name"] for t in tools}:
        raise ToolCallError("tool_choice", f"tool_choice names function '{named}', which is not in tools")
    if not (tool_choice in (None, "none", "auto", "required") or named is not None):
        raise ToolCallError("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or "
                                           "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def named_function(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def enforced(tool_choice: Any) -> bool:
    """Whether the answer must be tool calls (`required` or a named function): decoded under `grammar`."""
    return tool_choice == "required" or named_function(tool_choice) is not None


def grammar(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) whose sentences are tool calls of `tools`: one, or one or more when
    `parallel`; only the named function for a named tool_choice. Compact JSON, so arguments cannot run on in
    whitespace."""
    named = named_function(tool_choice)
    calls = []
    for tool in tools:
        function = tool["function"]
        if named is not None and function["name"] != named:
            continue
        calls.append({"type": "object", "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        }, "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return "\n".join([
        f"start: call{'+' if parallel else ''}",
        f"call: {json.dumps(OPEN)} \"\\n\"? call_object \"\\n\"? {json.dumps(CLOSE)}",
        f"call_object: %json {json.dumps(schema)}",
    ])


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_call(body: str) -> dict[str, Any] | None:
    """One call's JSON as an OpenAI tool call (arguments as a JSON string), or None when it is not a call."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": _call_id(), "type": "function", "function": {"name": value["name"], "arguments": arguments}}


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The content and the tool calls in a whole answer; with no call, the text is the content unchanged. A call
    cut off at the end (no closing tag) counts when its JSON is whole; text that is not a call stays content."""
    calls: list[dict[str, Any]] = []
    content: list[str] = []
    at = 0
    for match in CALL.finditer(text):
        call = _tool_call(match.group(1))
        content.append(text[at:match.start()] if call is not None else text[at:match.end()])
        if call is not None:
            calls.append(call)
        at = match.end()
    rest = text[at:]
    start = rest.find(OPEN)
    if start >= 0 and (call := _tool_call(rest[start + len(OPEN):].strip())) is not None:
        content.append(rest[:start])
        calls.append(call)
    else:
        content.append(rest)
    if not calls:
        return text, []
    joined = "".join(content).strip()
    return joined or None, calls


@dataclass
class ToolCallStream:
    """Streamed text split into content deltas and tool calls as they complete: text that may be the start of a
    `<tool_call>` is held back until it is decided, a call is sent once its closing tag has come (OpenAI's delta
    format: index, id, type, the name and the whole arguments string)."""

    held: str = ""
    count: int = 0  # tool calls sent so far
    _in_call: bool = field(default=False, repr=False)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """The content to send now and the tool-call deltas completed by `text`; `final`: the answer ended."""
        self.held += text
        content, calls = "", []
        while True:
            if not self._in_call:
                start = self.held.find(OPEN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self.held, OPEN)
                    content += self.held[:len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep:]
                    break
                content += self.held[:start]
                self.held = self.held[start:]
                self._in_call = True
            end = self.held.find(CLOSE)
            if end < 0:
                if final:  # cut off: a whole JSON still counts, anything else is content
                    call = _tool_call(self.held[len(OPEN):].strip())
                    if call is None:
                        content += self.held
                    else:
                        calls.append(self._delta(call))
                    self.held, self._in_call = "", False
                break
            body = self.held[len(OPEN):end]
            call = _tool_call(body.strip())
            if call is None:
                content += self.held[:end + len(CLOSE)]
            else:
                calls.append(self._delta(call))
            self.held, self._in_call = self.held[end + len(CLOSE):], False
        return content, calls

    def _delta(self, call: dict[str, Any]) -> dict[str, Any]:
        delta = {"index": self.count, **call}
        self.count += 1
        return delta


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
