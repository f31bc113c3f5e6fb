"""The checkpoint's chat template, rendered as transformers renders it (sandboxed Jinja2, `trim_blocks`,
`lstrip_blocks`, `raise_exception`), so the gateway turns chat messages into the prompt the model was tuned on.

The template comes from `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
`default` is used) or from `chat_template.jinja` beside it. A checkpoint without one (the shipped miniature) gets
the plain fallback: the messages' text joined by newlines, so a single user message is sent as it is.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or they are malformed)."""


def _token(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, template: str | None, special_tokens: dict[str, str]):
        self.source = template
        self.special_tokens = special_tokens
        self._template = None
        if template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(template)

    @classmethod
    def from_directory(cls, directory: str | Path | None) -> "ChatTemplate":
        """The template of the tokenizer files in `directory` (none when it or the files are missing)."""
        if directory is None:
            return cls(None, {})
        directory = Path(directory)
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        tokens = {k: _token(v) for k, v in config.items() if k.endswith("_token") and not isinstance(v, bool)}
        return cls(template, tokens)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for `messages` ({'role', 'content'}), ending where the assistant's answer begins. A leading
        BOS token is left to the server's tokenizer, which adds its own."""
        if self._template is None:
            return "\n".join(str(m.get("content") or "") for m in messages)
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError:
            raise
        except jinja2.TemplateError as error:
            raise TemplateError(f"the chat template failed on these messages: {error}") from error
        bos = self.special_tokens.get("bos_token")
        return text[len(bos):] if bos and text.startswith(bos) else text
