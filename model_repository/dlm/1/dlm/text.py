"""Text in and out: the checkpoint's tokenizer, and a request's committed tokens turned into text deltas that end
at the first stop word.

A delta never splits a character (a trailing U+FFFD from an incomplete UTF-8 sequence is held back) and never
shows text that could still turn out to be the start of a stop word; both are released by the next delta or the
final one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    """The checkpoint's `tokenizer.json`: encode prompts, decode generated tokens without special tokens."""

    def __init__(self, tokenizer_dir: str | Path):
        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}: copy the checkpoint's tokenizer files there")
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class TextStream:
    """One request's output text, delivered as deltas."""

    def __init__(self, codec: TextCodec, stop_words: Sequence[str] = ()):
        self.codec = codec
        self.stop_words = [w for w in stop_words if w]
        self.sent = 0  # characters delivered so far
        self.text = ""

    def update(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The text to send now for the committed `tokens`, and whether a stop word ended the text."""
        text = self.codec.decode(tokens)
        stops = [i for i in (text.find(w) for w in self.stop_words) if i >= 0]
        stopped = bool(stops)
        if stopped:
            text, final = text[: min(stops)], True
        end = len(text) if final else self._safe_end(text)
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self.text = text
        return delta, stopped

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for word in self.stop_words:  # hold back a tail that a stop word could still start with
            for k in range(min(len(word) - 1, end), 0, -1):
                if text[end - k : end] == word[:k]:
                    end -= k
                    break
        return end
