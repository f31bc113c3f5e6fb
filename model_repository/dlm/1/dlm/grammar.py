"""Grammar constraints (structured outputs) with llguidance, compiled against the checkpoint's tokenizer.

A request's guide (TensorRT-LLM's Triton names: `guided_decoding_guide_type` json, json_schema, regex or lark, and
`guided_decoding_guide`) becomes a `Grammar` once, checked by llguidance's compiler (its message is the refusal);
each sequence runs its own `Constraint`, a matcher that says which tokens may come next as the engine's bitmask
layout (int32 words, bit j of word w: token 32·w + j, DESIGN §4a) and follows the committed tokens.

The tokenizer llguidance sees is built from our own `TextCodec` (the exact bytes of every token, special tokens
marked special, so no grammar ever asks for them; the mask id is special too), since llguidance's own reader does
not take every `tokenizer.json` decoder (the miniature's Fuse decoder, for one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

GUIDE_TYPES = ("json", "json_schema", "regex", "lark")
# JSON without free whitespace (separators "," and ":"; a schema's own x-guidance settings override it): a model
# cannot spend its max_tokens on spaces and newlines inside a structure, so a bounded schema always completes
COMPACT: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions (a TypedDict)


class GrammarError(ValueError):
    """A guide the compiler refuses; the message is the compiler's."""


class _Tokens:
    """What llguidance's `TokenizerWrapper` reads: every token's bytes, the end token, the special ids, encode."""

    def __init__(self, codec: Any, vocab_size: int, eos_token_id: int, special_ids: set[int]):
        size = codec.tokenizer.get_vocab_size()
        self.tokens = [codec.token_bytes(i) if i < size else b"" for i in range(vocab_size)]
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self.special_token_ids = sorted(special_ids)
        self._codec = codec

    def __call__(self, text: bytes | str) -> list[int]:
        return self._codec.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, False)


class Compiler:
    """Compiles guides for one checkpoint: `codec` (`dlm.text.TextCodec`), the model's vocabulary size (the
    engine's, which may exceed the tokenizer's), its end token and mask id."""

    def __init__(self, codec: Any, vocab_size: int, eos_token_id: int, mask_token_id: int):
        import llguidance
        import llguidance.numpy

        self._llguidance = llguidance
        self._fill = llguidance.numpy.fill_next_token_bitmask
        special = set(codec.special_ids) | {mask_token_id}
        special.discard(eos_token_id)
        wrapper = llguidance.TokenizerWrapper(_Tokens(codec, vocab_size, eos_token_id, special | {eos_token_id}))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def compile(self, guide_type: str, guide: str) -> "Grammar":
        """Raises GrammarError with the compiler's message for a guide it refuses."""
        matcher = self._llguidance.LLMatcher
        try:
            if guide_type == "json":  # any JSON object (OpenAI's json_object); a guide, if given, is a schema
                grammar = matcher.grammar_from_json_schema(json.loads(guide) if guide.strip() else {"type": "object"},
                                                           defaults=COMPACT)
            elif guide_type == "json_schema":
                grammar = matcher.grammar_from_json_schema(json.loads(guide), defaults=COMPACT)
            elif guide_type == "regex":
                grammar = matcher.grammar_from_regex(guide)
            elif guide_type == "lark":
                grammar = matcher.grammar_from_lark(guide)
            else:
                raise GrammarError(f"guided_decoding_guide_type '{guide_type}' is unknown: expected one of "
                                   f"{', '.join(GUIDE_TYPES)}")
        except json.JSONDecodeError as e:
            raise GrammarError(f"guided_decoding_guide is not valid JSON: {e}") from e
        except (ValueError, TypeError) as e:
            if isinstance(e, GrammarError):
                raise
            raise GrammarError(f"guided_decoding_guide ({guide_type}) is not valid, the compiler says: {e}") from e
        error = matcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"guided_decoding_guide ({guide_type}) is not valid, the compiler says: {error}")
        return Grammar(self, grammar, guide_type)


@dataclass(frozen=True)
class Grammar:
    """A compiled guide; `start()` gives one sequence its own matcher."""

    compiler: Compiler
    grammar: str
    guide_type: str

    def start(self) -> "Constraint":
        return Constraint(self.compiler, self.compiler._llguidance.LLMatcher(self.compiler.tokenizer, self.grammar,
                                                                             log_level=0))


class Constraint:
    """One sequence's matcher: the allowed tokens after what it has consumed, as bitmask words."""

    def __init__(self, compiler: Compiler, matcher: Any):
        self.compiler = compiler
        self.matcher = matcher
        self.words = -(-compiler.vocab_size // 32)
        self.consumed = 0  # answer tokens consumed

    def mask(self) -> np.ndarray:
        """[W] int32: the tokens allowed next (only the end token once the grammar is complete and stopped)."""
        out = np.zeros(self.words, dtype=np.int32)
        if self.matcher.is_stopped():
            out[self.compiler.eos_token_id // 32] = np.uint32(1 << (self.compiler.eos_token_id % 32)).view(np.int32)
            return out
        self.compiler._fill(self.matcher, out[None], 0)
        return out

    @staticmethod
    def allows(mask: np.ndarray, token: int) -> bool:
        return bool((int(mask[token // 32]) >> (token % 32)) & 1)

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))
        self.consumed += 1

    def advance(self, tokens: list[int]) -> None:
        """Consume the committed tokens not consumed yet."""
        for token in tokens[self.consumed:]:
            self.consume(token)

    def masks_along(self, tokens: list[int] | np.ndarray, positions: int) -> np.ndarray:
        """[positions, W]: the allowed tokens before each of `tokens` in turn (a draft), the first the current
        state's; after the first token the grammar refuses, the rest repeat that position's mask (a draft cannot be
        accepted past it). The matcher is left as it was."""
        masks = np.empty((positions, self.words), dtype=np.int32)
        taken = 0
        for i in range(positions):
            masks[i] = self.mask()
            if i >= len(tokens) or not self.allows(masks[i], int(tokens[i])) or self.matcher.is_stopped():
                masks[i + 1:] = masks[i]
                break
            self.matcher.consume_token(int(tokens[i]))
            taken += 1
        if taken:
            self.matcher.rollback(taken)
        return masks

    @property
    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""
