"""What `python -m client.audit` reads: the prompts file (JSONL, each line a prompt or chat messages, optionally a
reference answer and its scorer) and the grid of decoding settings to compare with `ar`.

One prompt per line, a JSON object:

    {"prompt": "4821+377=", "reference": "5198", "scorer": "number"}
    {"messages": [{"role": "user", "content": "upper:abc="}], "reference": "ABC"}
    {"prompt": "Name a prime.", "reference": "\\\\b(2|3|5|7)\\\\b", "scorer": "regex", "id": "q17", "max_tokens": 8}

- `prompt` (text sent as it is) or `messages` (rendered into the prompt by the checkpoint's chat template, as the
  gateway renders them: `client.gateway.Message`, `client.chat_template.ChatTemplate`);
- `reference` and `scorer`: `exact` (the default: the text, stripped, equals the reference), `contains` (the text
  contains it), `number` (the last number in the text equals it; thousands commas are ignored), `regex` (the
  reference is a Python regular expression found in the text);
- `id` (any JSON value, echoed in the report), `max_tokens` (this prompt's limit), `meta` (ignored).

Any other key, a malformed line, an unknown scorer or an invalid regex is an `AuditInputError` naming the line.

A grid is a JSON list of settings, each an object of request fields (`mode`, `threshold`, `steps`,
`block_length`, `remask_threshold`, `max_remasks`) and an optional `name`; the values' ranges are the server's to
check (a setting it refuses is reported as failed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from client.chat_template import ChatTemplate, TemplateError
from client.request import MODES

SCORERS = ("exact", "contains", "number", "regex")
PROMPT_KEYS = ("prompt", "messages", "reference", "scorer", "id", "max_tokens", "meta")
# request fields a grid setting may set, and the JSON types each takes (bool is refused where int is asked)
SETTING_FIELDS: dict[str, tuple[type, ...]] = {
    "mode": (str,),
    "threshold": (int, float),
    "steps": (int,),
    "block_length": (int,),
    "remask_threshold": (int, float),
    "max_remasks": (int,),
}
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?|[-+]?\.\d+")

# The default grid (DESIGN §5a, issue 12): thresholds 0.5-0.99, fixed steps with no threshold, block lengths,
# self-speculation, and re-masking (`remask_threshold` with at most `max_remasks` re-maskings per block).
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
STEPS = (1, 2, 4, 8)
BLOCK_LENGTHS = (16, 32, 64)
REMASKING = ((0.7, 0.3), (0.7, 0.5), (0.5, 0.3), (0.5, 0.5))  # (threshold, remask_threshold)
MAX_REMASKS = 8


class AuditInputError(ValueError):
    """The prompts file or the grid is malformed; the message names the line or the setting."""


@dataclass(frozen=True)
class AuditPrompt:
    line: int  # 1-based line of the prompts file
    prompt: str  # the text sent (messages rendered by the chat template)
    reference: str | None = None
    scorer: str | None = None  # one of SCORERS when a reference is given
    id: Any = None
    max_tokens: int | None = None
    messages: list[dict[str, Any]] | None = None
    # false for messages the checkpoint's template rendered: its special tokens are in the text (as transformers'
    # apply_chat_template(tokenize=True) encodes it); the plain fallback's prompt gets them like any other
    add_special_tokens: bool = True
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def correct(self, text: str) -> bool | None:
        """Whether `text` answers the prompt right by its scorer; None without a reference."""
        if self.reference is None:
            return None
        return score(self.scorer or "exact", self.reference, text, self.pattern)


def last_number(text: str) -> Decimal | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def score(scorer: str, reference: str, text: str, pattern: re.Pattern[str] | None = None) -> bool:
    if scorer == "exact":
        return text.strip() == reference.strip()
    if scorer == "contains":
        return reference in text
    if scorer == "number":
        number = last_number(text)
        return number is not None and number == last_number(reference)
    if scorer == "regex":
        return (pattern or re.compile(reference)).search(text) is not None
    raise AuditInputError(f"unknown scorer '{scorer}': expected one of {', '.join(SCORERS)}")


def _messages(where: str, value: Any) -> list[dict[str, Any]]:
    """The messages as the gateway takes them (its `Message` model: role, text or text parts), as plain dicts."""
    from pydantic import ValidationError

    from client.gateway import Message  # the gateway's own validation, shared rather than copied

    if not isinstance(value, list) or not value:
        raise AuditInputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, message in enumerate(value):
        try:
            out.append(Message.model_validate(message).as_dict())
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
                                 for e in error.errors())
            raise AuditInputError(f"{where}: messages[{i}] is not a chat message ({problems})") from None
    return out


def parse_prompt(line: int, text: str, template: ChatTemplate, where: str) -> AuditPrompt:
    """One line of the prompts file (`where` names it in errors: 'FILE line N')."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        raise AuditInputError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(item, dict):
        raise AuditInputError(f"{where}: expected a JSON object with 'prompt' or 'messages', got "
                              f"{type(item).__name__}")
    unknown = sorted(set(item) - set(PROMPT_KEYS))
    if unknown:
        raise AuditInputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}: expected some of "
                              f"{', '.join(PROMPT_KEYS)}")
    if ("prompt" in item) == ("messages" in item):
        raise AuditInputError(f"{where}: give exactly one of 'prompt' (text) and 'messages' (chat messages)")
    messages = None
    if "prompt" in item:
        prompt = item["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise AuditInputError(f"{where}: 'prompt' must be a non-empty string")
    else:
        messages = _messages(where, item["messages"])
        try:
            prompt = template.render(messages)
        except TemplateError as error:
            raise AuditInputError(f"{where}: the chat template cannot render these messages: {error}") from None
        if not prompt:
            raise AuditInputError(f"{where}: the messages render to an empty prompt")

    reference, scorer = item.get("reference"), item.get("scorer")
    if reference is not None:
        if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
            raise AuditInputError(f"{where}: 'reference' must be a string or a number")
        reference = str(reference)
    if scorer is not None:
        if scorer not in SCORERS:
            raise AuditInputError(f"{where}: unknown scorer {scorer!r}: expected one of {', '.join(SCORERS)}")
        if reference is None:
            raise AuditInputError(f"{where}: scorer '{scorer}' needs a 'reference'")
    pattern = None
    if reference is not None:
        scorer = scorer or "exact"
        if scorer == "regex":
            try:
                pattern = re.compile(reference)
            except re.error as error:
                raise AuditInputError(f"{where}: invalid regex {reference!r}: {error}") from None
        if scorer == "number" and last_number(reference) is None:
            raise AuditInputError(f"{where}: scorer 'number' needs a numeric reference, got {reference!r}")
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise AuditInputError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    rendered = messages is not None and bool(template.templates)
    return AuditPrompt(line, prompt, reference, scorer, item.get("id"), max_tokens, messages,
                       add_special_tokens=not rendered, pattern=pattern)


def load_prompts(path: str | Path, template: ChatTemplate) -> list[AuditPrompt]:
    """The prompts of a JSONL file (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AuditInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AuditInputError(f"{path}: cannot be read as UTF-8 text: {error}") from None
    prompts = [parse_prompt(i, line, template, f"{path} line {i}")
               for i, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise AuditInputError(f"{path}: holds no prompts (one JSON object per line)")
    return prompts


@dataclass(frozen=True)
class Setting:
    name: str
    fields: dict[str, Any]  # the request fields it sends (besides temperature 0 and max_tokens)

    @property
    def is_reference(self) -> bool:
        return self.fields == {"mode": "ar"}


def setting_name(fields: dict[str, Any]) -> str:
    rest = " ".join(f"{k}={v}" for k, v in fields.items() if k != "mode")
    return f"{fields.get('mode', 'default mode')}{' ' + rest if rest else ''}"


REFERENCE = Setting("ar", {"mode": "ar"})


def default_grid() -> list[Setting]:
    grid = [{"mode": "diffusion", "threshold": t} for t in THRESHOLDS]
    grid += [{"mode": "diffusion", "steps": s} for s in STEPS]
    grid += [{"mode": "diffusion", "block_length": b} for b in BLOCK_LENGTHS]
    grid += [{"mode": "speculative"}]
    grid += [{"mode": "diffusion", "threshold": t, "remask_threshold": r, "max_remasks": MAX_REMASKS}
             for t, r in REMASKING]
    return [Setting(setting_name(fields), fields) for fields in grid]


def parse_grid(value: Any, where: str = "grid") -> list[Setting]:
    """Settings from a parsed grid (a list of objects); an `ar` entry is dropped (it is always the reference)."""
    if not isinstance(value, list) or not value:
        raise AuditInputError(f"{where}: expected a non-empty JSON list of settings, e.g. "
                              '[{"mode": "diffusion", "threshold": 0.8}, {"mode": "speculative"}]')
    settings: list[Setting] = []
    for i, entry in enumerate(value):
        at = f"{where} entry {i}"
        if not isinstance(entry, dict):
            raise AuditInputError(f"{at}: expected an object of request fields, got {type(entry).__name__}")
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise AuditInputError(f"{at}: 'name' must be a non-empty string")
        fields = {k: v for k, v in entry.items() if k != "name"}
        unknown = sorted(set(fields) - set(SETTING_FIELDS))
        if unknown:
            raise AuditInputError(f"{at}: unknown field(s) {', '.join(map(repr, unknown))}: expected some of "
                                  f"{', '.join(SETTING_FIELDS)} (and 'name')")
        if not fields:
            raise AuditInputError(f"{at}: sets no request field")
        for key, kinds in SETTING_FIELDS.items():
            if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], kinds)):
                raise AuditInputError(f"{at}: '{key}' must be {' or '.join(k.__name__ for k in kinds)}, got "
                                      f"{fields[key]!r}")
        if "mode" in fields and fields["mode"] not in MODES:
            raise AuditInputError(f"{at}: mode {fields['mode']!r} is unknown: expected one of {', '.join(MODES)}")
        if fields == REFERENCE.fields:
            continue
        settings.append(Setting(name or setting_name(fields), fields))
    names = [s.name for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1} | ({"ar"} & set(names)))
    if repeated:
        raise AuditInputError(f"{where}: setting name(s) {', '.join(map(repr, repeated))} used twice (or 'ar', the "
                              f"reference's): give each a distinct 'name'")
    if not settings:
        raise AuditInputError(f"{where}: holds only the reference ar; add the settings to compare with it")
    return settings


def load_grid(value: str) -> list[Setting]:
    """`--grid`: inline JSON, or the path of a JSON file."""
    text, where = value, "--grid"
    if not value.lstrip().startswith(("[", "{")):
        path = Path(value)
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as error:
            raise AuditInputError(f"--grid {value}: neither inline JSON nor a readable file ({error})") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise AuditInputError(f"{where}: not valid JSON ({error.msg} at line {error.lineno} column "
                              f"{error.colno})") from None
    return parse_grid(parsed, where)
