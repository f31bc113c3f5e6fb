"""Text in and out: the checkpoint's tokenizer, each token's raw bytes, and a request's committed tokens turned into
text deltas that end at the first stop word.

A delta never splits a character (a trailing U+FFFD from an incomplete UTF-8 sequence is held back) and never
shows text that could still turn out to be the start of a stop word; both are released by the next delta or the
final one. The tokens a stream has delivered follow its text: a token counts as delivered once the text sent so far
holds all of it (so one that ends in the middle of a character waits for the rest of that character).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dlm.tokenizer_files import load_tokenizer

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte tokens


def byte_level_alphabet() -> dict[str, int]:
    """The printable character a byte-level BPE (GPT-2's `bytes_to_unicode`) writes for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def _decoder_types(decoder: Any) -> Iterator[str]:
    if isinstance(decoder, dict):
        yield str(decoder.get("type"))
        for inner in decoder.get("decoders") or ():
            yield from _decoder_types(inner)


class TextCodec:
    """The checkpoint's `tokenizer.json` (as transformers 5 runs it, `dlm.tokenizer_files`): encode prompts, decode
    generated tokens without special tokens."""

    def __init__(self, tokenizer_dir: str | Path):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        decoders = set(_decoder_types(json.loads(self.tokenizer.to_str()).get("decoder")))
        self.byte_level = "ByteLevel" in decoders
        self.byte_fallback = "ByteFallback" in decoders
        added = self.tokenizer.get_added_tokens_decoder()
        self.added_ids = frozenset(added)
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._alphabet = byte_level_alphabet()
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for, exact even when they are part of a UTF-8 character: a
        byte-level BPE token's string mapped back through the byte alphabet, a byte-fallback token's byte, else the
        decoded piece's UTF-8. A special token gives its written form (e.g. b"</s>")."""
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocabulary")
        if token_id in self.added_ids:  # written as it is, not through the byte alphabet
            return piece.encode("utf-8")
        if self.byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        fallback = BYTE_FALLBACK.match(piece) if self.byte_fallback else None
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text_bytes(self, token_id: int) -> bytes:
        """The bytes the token adds to decoded text (special tokens are left out of it)."""
        return b"" if token_id in self.special_ids else self.token_bytes(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The prompt's ids. `add_special_tokens` false: what the post-processor adds (a BOS) is left out, as
        transformers' `apply_chat_template(..., tokenize=True)` encodes a rendered chat prompt."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class TextStream:
    """One request's output text, delivered as deltas."""

    def __init__(self, codec: TextCodec, stop_words: Sequence[str] = ()):
        self.codec = codec
        self.stop_words = [w for w in stop_words if w]
        self.sent = 0  # characters delivered so far
        self.text = ""
        self.final = self.stopped = False
        # per token seen so far: the characters of the text up to its end, or -1 when it ends mid-character; and
        # the characters completed before it (the index of the character its first byte belongs to)
        self._ends: list[int] = []
        self._starts: list[int] = []
        self._chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the tokenizer decodes

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
        self.text, self.final, self.stopped = text, final, stopped
        return delta, stopped

    def delivered_tokens(self, tokens: list[int]) -> int:
        """How many of `tokens` (those of the last `update`) the text delivered so far covers: every token whose
        bytes all lie in it. After a final update this is all of them, or, when a stop word cut the text, those up
        to the one the cut falls in."""
        for token in tokens[len(self._ends):]:
            self._starts.append(self._chars)
            self._chars += len(self._decoder.decode(self.codec.text_bytes(token)))
            self._ends.append(-1 if self._decoder.getstate()[0] else self._chars)
        if self.final and not self.stopped:
            return len(tokens)
        delivered = 0
        for i, end in enumerate(self._ends[: len(tokens)]):
            if self.final:  # cut by a stop word: the tokens that start before the cut
                if self._starts[i] >= self.sent:
                    break
                delivered = i + 1
            elif end > self.sent:
                break
            elif end >= 0:
                delivered = i + 1
        return delivered

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for word in self.stop_words:  # hold back a tail that a stop word could still start with
            for k in range(min(len(word) - 1, end), 0, -1):
                if text[end - k : end] == word[:k]:
                    end -= k
                    break
        return end
