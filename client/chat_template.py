"""The checkpoint's chat template, rendered as transformers 5 renders it in `apply_chat_template` (sandboxed Jinja2
with `trim_blocks`, `lstrip_blocks` and loop controls; its `tojson`, `raise_exception` and `strftime_now`; the
named special tokens, `tools`, `documents` and any extra keyword such as `enable_thinking` passed to the template).

Where the template comes from, in transformers' order: `chat_template.jinja` beside the tokenizer, else
`tokenizer_config.json`'s `chat_template` (a string, or named templates: `tool_use` when tools are given and it
exists, else `default`). A checkpoint without one (the shipped miniature) gets the plain fallback: the messages'
text joined by newlines, so a single user message is sent as it is.

The rendered text keeps every special token the template wrote (its BOS among them); it is encoded with no special
tokens added (`add_special_tokens` false), as `apply_chat_template(..., tokenize=True)` encodes it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens every template sees
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or they are malformed)."""


def _token(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' own filter: Jinja's escapes HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ChatTemplate:
    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str]):
        """`templates`: the checkpoint's templates by name (one named `default` when it has a single one)."""
        self.templates = templates
        self.special_tokens = special_tokens
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled = {name: env.from_string(source) for name, source in templates.items()}

    @property
    def source(self) -> str | None:
        return self.templates.get("default")

    @classmethod
    def from_directory(cls, directory: str | Path | None) -> "ChatTemplate":
        """The template of the tokenizer files in `directory` (none when it or the files are missing)."""
        if directory is None:
            return cls({}, {})
        directory = Path(directory)
        config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
        templates: dict[str, str] = {}
        configured = config.get("chat_template")
        if isinstance(configured, list):
            templates = {t["name"]: t["template"] for t in configured if isinstance(t, dict) and "name" in t}
        elif isinstance(configured, str):
            templates = {"default": configured}
        if (directory / "chat_template.jinja").is_file():  # transformers: the file takes priority
            templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        tokens = {name: token for name in SPECIAL_TOKEN_NAMES if (token := _token(config.get(name))) is not None}
        return cls(templates, tokens)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               documents: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """The prompt for `messages` ({'role', 'content', ...}), ending where the assistant's answer begins;
        `template_kwargs` (vLLM's `chat_template_kwargs`, e.g. `enable_thinking`) go to the template as they are."""
        if not self._compiled:
            return "\n".join(str(m.get("content") or "") for m in messages)
        name = "tool_use" if tools is not None and "tool_use" in self._compiled else "default"
        if name not in self._compiled:
            raise TemplateError(f"the checkpoint has chat templates {sorted(self._compiled)} but none named 'default'")
        try:
            return self._compiled[name].render(
                messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **template_kwargs})
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            raise TemplateError(f"the chat template failed on these messages: {error}") from error
