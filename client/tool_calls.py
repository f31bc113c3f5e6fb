"""OpenAI tool calls over a checkpoint's own tool-call syntax: the request's `tools` and `tool_choice` checked, the
grammar that enforces `tool_choice` "required" or a named function, and the model's text parsed into `tool_calls`
(whole, or as streamed deltas).

The syntax is the one the chat template writes for an assistant's tool calls (`SYNTAXES`, named after the vLLM tool
parser that reads it):
- `hermes` (the instruct template of our tests, Qwen's, Hermes'): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, one element per call, optionally with a newline inside the tags;
- `llama_nemotron_json` (NVIDIA's Llama-Nemotron templates): `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]
  </TOOLCALL>`, one element holding a list of calls.
Mistral's `[TOOL_CALLS]` is a special token that the server leaves out of the text, so a template that writes it is
refused by name rather than parsed wrongly.

Enforcement compiles to a Lark grammar (llguidance's, with the calls as an inline `%json` schema: `name` the
function's, `arguments` its `parameters`), sent as the guided decoding inputs: the model writes one call (or several
when `parallel_tool_calls` allows) and then only its end token can follow.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any



@dataclass(frozen=True)
class Syntax:
    """How a template writes tool calls: the tags around an element, and whether an element is one call's JSON
    object or a JSON list of calls."""

    name: str
    open: str
    close: str
    listed: bool

    @property
    def element(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.open) + r"\s*(.*?)\s*" + re.escape(self.close), re.DOTALL)


HERMES = Syntax("hermes", "<tool_call>", "</tool_call>", listed=False)
NEMOTRON = Syntax("llama_nemotron_json", "<TOOLCALL>", "</TOOLCALL>", listed=True)
SYNTAXES = {s.name: s for s in (HERMES, NEMOTRON)}
PARSERS = ("auto", *SYNTAXES)
USES_TOOLS = re.compile(r"\{[{%][^}]*\btools\b")  # a template statement or expression that reads `tools`


class ToolCallError(ValueError):
    """A `tools` / `tool_choice` the gateway cannot honour; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parser_for(template_source: str | None, choice: str = "auto") -> Syntax | None:
    """The tool-call syntax of a chat template (the one whose opening tag it writes), or None when it writes none
    this gateway reads. `choice` (the gateway's --tool-call-parser) other than auto is taken as it is."""
    if choice != "auto":
        return SYNTAXES[choice]
    for syntax in SYNTAXES.values():
        if template_source and syntax.open in template_source:
            return syntax
    return None


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None,
                parser: Syntax | None, template_source: str | None) -> None:
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
                                     f"(--tool-call-parser hermes), <TOOLCALL>[json, ...]</TOOLCALL> "
                                     f"(llama_nemotron_json)")
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


def grammar(syntax: Syntax, tools: list[dict[str, Any]], tool_choice: Any, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) whose sentences are tool calls of `tools` in `syntax`: one, or one or
    more when `parallel`; only the named function for a named tool_choice. Compact JSON, so arguments cannot run on
    in whitespace."""
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
    repeat = "+" if parallel else ""
    if syntax.listed:  # one element, a list of one call (or more)
        schema = {"type": "array", "items": schema, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        repeat = ""
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return "\n".join([
        f"start: element{repeat}",
        f"element: {json.dumps(syntax.open)} \"\\n\"? body \"\\n\"? {json.dumps(syntax.close)}",
        f"body: %json {json.dumps(schema)}",
    ])


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(value: Any) -> dict[str, Any] | None:
    """One call's JSON value as an OpenAI tool call (arguments as a JSON string), or None when it is not a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": _call_id(), "type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _tool_calls(syntax: Syntax, body: str) -> list[dict[str, Any]] | None:
    """The calls of one element's JSON, or None when it is not what the syntax writes (then it stays content)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    values = value if syntax.listed and isinstance(value, list) else None if syntax.listed else [value]
    calls = [_call(v) for v in values or []]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse(syntax: Syntax, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The content and the tool calls in a whole answer; with no call, the text is the content unchanged. An element
    cut off at the end (no closing tag) counts when its JSON is whole; text that is not a call stays content."""
    calls: list[dict[str, Any]] = []
    content: list[str] = []
    at = 0
    for match in syntax.element.finditer(text):
        found = _tool_calls(syntax, match.group(1))
        content.append(text[at:match.start()] if found is not None else text[at:match.end()])
        calls.extend(found or [])
        at = match.end()
    rest = text[at:]
    start = rest.find(syntax.open)
    if start >= 0 and (found := _tool_calls(syntax, rest[start + len(syntax.open):].strip())) is not None:
        content.append(rest[:start])
        calls.extend(found)
    else:
        content.append(rest)
    if not calls:
        return text, []
    joined = "".join(content).strip()
    return joined or None, calls


@dataclass
class ToolCallStream:
    """Streamed text split into content deltas and tool calls as they complete: text that may be the start of an
    element (`<tool_call>`) is held back until it is decided, a call is sent once its element's closing tag has come
    (OpenAI's delta format: index, id, type, the name and the whole arguments string)."""

    syntax: Syntax
    held: str = ""
    count: int = 0  # tool calls sent so far
    _in_call: bool = field(default=False, repr=False)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """The content to send now and the tool-call deltas completed by `text`; `final`: the answer ended."""
        syntax = self.syntax
        self.held += text
        content, calls = "", list[dict[str, Any]]()
        while True:
            if not self._in_call:
                start = self.held.find(syntax.open)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self.held, syntax.open)
                    content += self.held[:len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep:]
                    break
                content += self.held[:start]
                self.held = self.held[start:]
                self._in_call = True
            end = self.held.find(syntax.close)
            if end < 0:
                if final:  # cut off: a whole JSON still counts, anything else is content
                    found = _tool_calls(syntax, self.held[len(syntax.open):].strip())
                    content += self.held if found is None else ""
                    calls.extend(self._delta(call) for call in found or [])
                    self.held, self._in_call = "", False
                break
            found = _tool_calls(syntax, self.held[len(syntax.open):end].strip())
            content += self.held[:end + len(syntax.close)] if found is None else ""
            calls.extend(self._delta(call) for call in found or [])
            self.held, self._in_call = self.held[end + len(syntax.close):], False
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
