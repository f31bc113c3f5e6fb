"""Generated tokens' log probs in OpenAI's two formats, for the gateway (`client/gateway.py`):

- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, where each
  `top_logprobs` entry holds the requested alternatives and the chosen token (so up to n + 1 entries, as OpenAI says);
- chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

A token whose bytes are not whole UTF-8 characters (byte-level BPE splits rare characters) is written, as OpenAI
writes it, `bytes:\\xe6\\x97`; its exact bytes are in the chat format's `bytes`. A log prob JSON cannot hold (-inf)
is written -9999.0, as vLLM does, and so is one below it: under a grammar, a candidate the grammar excludes has a log
prob of about -1e30 (its logit masked in the graph), shown when fewer tokens than asked for are allowed.
"""

from __future__ import annotations

import codecs
import math
from typing import Any

from client.result import Alternative, Token

MAX_LOGPROBS = 20  # OpenAI's bound on alternatives per token
FLOOR = -9999.0


def token_string(token: bytes) -> str:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > FLOOR else FLOOR


class CompletionLogprobs:
    """One completion's `logprobs`, chunk by chunk: `text_offset` counts characters from the completion's start
    across chunks (a token that completes a character split across tokens starts where that character does)."""

    def __init__(self) -> None:
        self._chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def chunk(self, tokens: tuple[Token, ...] | list[Token]) -> dict[str, Any]:
        offsets = []
        for token in tokens:
            offsets.append(self._chars)
            self._chars += len(self._decoder.decode(token.token))
        return {
            "tokens": [token_string(t.token) for t in tokens],
            "token_logprobs": [_logprob(t.logprob) for t in tokens],
            "top_logprobs": [
                {token_string(a.token): _logprob(a.logprob) for a in (*t.top_logprobs, t)} for t in tokens
            ],
            "text_offset": offsets,
        }


def _chat_entry(token: Alternative) -> dict[str, Any]:
    return {"token": token_string(token.token), "logprob": _logprob(token.logprob), "bytes": list(token.token)}


def chat_logprobs(tokens: tuple[Token, ...] | list[Token]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`."""
    content = [{**_chat_entry(t), "top_logprobs": [_chat_entry(a) for a in t.top_logprobs]} for t in tokens]
    return {"content": content, "refusal": None}
