"""The Triton model contract's inputs (DESIGN §5): defaults from `config.pbtxt` parameters, and one request's
tensors parsed and checked into what the scheduler needs. Every refusal is an `InvalidInput` that names the input
and what it allows, so Triton can send it back as the request's error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dlm.refine import MODES, GenerationParams

INT32_MAX = 2**31 - 1
BYTES_PER_POSITION = 64  # no tokenizer packs more text into one token: a longer prompt cannot fit the context
MAX_STOP_WORDS, MAX_STOP_WORD_BYTES = 16, 256
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows


class InvalidInput(ValueError):
    """A request input that is missing, malformed or out of range."""


@dataclass(frozen=True)
class Limits:
    """What this engine and cache allow."""

    context: int  # positions one request may use: prompt + max_tokens + one block
    max_block_length: int  # the longest block a pass may carry (the artifact's token axis)
    top_k: int = 64  # K: the candidates the engine returns per position (the artifact's contract)

    @property
    def max_top_logprobs(self) -> int:
        return min(MAX_TOP_LOGPROBS, self.top_k)

    @property
    def max_text_bytes(self) -> int:
        return BYTES_PER_POSITION * self.context

    def check_block_length(self, value: int) -> None:
        if not 2 <= value <= self.max_block_length:
            raise InvalidInput(f"block_length must be in [2, {self.max_block_length}], got {value}")


@dataclass(frozen=True)
class Defaults:
    """Request defaults from `config.pbtxt` parameters (`default_mode`, `max_tokens`, `block_length`, `threshold`,
    `steps`); an empty `threshold` means fixed `steps` per block, an empty `block_length` the checkpoint's."""

    mode: str = "diffusion"
    max_tokens: int = 64
    block_length: int | None = None
    threshold: float | None = 0.9
    steps: int = 8

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "Defaults":
        def number(key: str, kind: Callable[[str], Any], default: Any) -> Any:
            value = parameters.get(key, "").strip()
            if not value:
                return default
            try:
                return kind(value)
            except ValueError as e:
                raise ValueError(f"config.pbtxt parameter {key} = '{value}' is not a valid {kind.__name__}") from e

        defaults = cls(
            mode=parameters.get("default_mode", "").strip() or cls.mode,
            max_tokens=number("max_tokens", int, cls.max_tokens),
            block_length=number("block_length", int, None),
            threshold=number("threshold", float, None) if "threshold" in parameters else cls.threshold,
            steps=number("steps", int, cls.steps),
        )
        GenerationParams(defaults.mode, defaults.max_tokens, defaults.block_length, defaults.threshold,
                         defaults.steps).validate()
        return defaults


@dataclass
class ParsedRequest:
    text: str
    params: GenerationParams
    stream: bool = False
    stop_words: list[str] = field(default_factory=list)


def _one(name: str, array: np.ndarray) -> Any:
    if array.size != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"input '{name}' is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if isinstance(value, str):
        return value
    raise InvalidInput(f"input '{name}' must be BYTES (UTF-8 text), got {type(value).__name__}")


def _integer(name: str, value: Any, low: int, high: int) -> int:
    number = int(value)
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be in [{low}, {high}], got {number}")
    return number


def parse_request(
    get: Callable[[str], np.ndarray | None], defaults: Defaults, limits: Limits, block_size: int
) -> ParsedRequest:
    """`get(name)` returns an input's array, or None when the request left it out."""
    raw = get("text_input")
    if raw is None:
        raise InvalidInput("input 'text_input' is missing: send the prompt as BYTES")
    prompt = _one("text_input", raw)
    if isinstance(prompt, bytes) and len(prompt) > limits.max_text_bytes:
        raise InvalidInput(
            f"input 'text_input' is {len(prompt)} bytes, more than the {limits.max_text_bytes} a prompt for this "
            f"server's {limits.context}-position context can use"
        )
    text = _text("text_input", prompt)
    if not text:
        raise InvalidInput("input 'text_input' is empty: send a prompt of at least one character")

    def value(name: str) -> Any:
        array = get(name)
        return None if array is None else _one(name, array)

    mode = value("mode")
    mode = defaults.mode if mode is None else _text("mode", mode)
    if mode not in MODES:
        raise InvalidInput(f"mode '{mode}' is unknown: expected one of {', '.join(MODES)}")

    block_length = value("block_length")
    if block_length is not None:
        limits.check_block_length(int(block_length))
        block_length = int(block_length)
    else:
        block_length = defaults.block_length
    block = block_length or block_size

    max_tokens = value("max_tokens")
    max_tokens = defaults.max_tokens if max_tokens is None else _integer("max_tokens", max_tokens, 1, INT32_MAX)
    if max_tokens > limits.context - block - 1:
        raise InvalidInput(
            f"max_tokens must be in [1, {limits.context - block - 1}] (this server's {limits.context}-position "
            f"context less one block of {block}), got {max_tokens}"
        )

    threshold, steps = value("threshold"), value("steps")
    if threshold is not None:
        threshold = float(threshold)
        if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
            raise InvalidInput(f"threshold must be in (0, 1], got {threshold}")
    elif steps is None:
        threshold = defaults.threshold
    steps = defaults.steps if steps is None else _integer("steps", steps, 1, block)

    temperature = value("temperature")
    temperature = 0.0 if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature}")

    top_k = value("top_k")
    top_k = None if top_k is None else _integer("top_k", top_k, 1, limits.top_k)
    top_p = value("top_p")
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:  # NaN fails this too
            raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")

    return_log_probs, top_logprobs = value("return_log_probs"), value("top_logprobs")
    top_logprobs = 0 if top_logprobs is None else _integer("top_logprobs", top_logprobs, 0, limits.max_top_logprobs)
    logprobs = top_logprobs if top_logprobs > 0 or (return_log_probs is not None and bool(return_log_probs)) else None

    seed, stream, stop = value("seed"), value("stream"), get("stop_words")
    params = GenerationParams(
        mode=mode, max_tokens=max_tokens, block_length=block_length, threshold=threshold, steps=steps,
        temperature=temperature, seed=None if seed is None else int(seed), top_k=top_k, top_p=top_p,
        logprobs=logprobs,
    )
    stop_words = [] if stop is None else [_text("stop_words", w) for w in stop.reshape(-1)]
    if len(stop_words) > MAX_STOP_WORDS or any(len(w.encode()) > MAX_STOP_WORD_BYTES for w in stop_words):
        raise InvalidInput(
            f"stop_words allows at most {MAX_STOP_WORDS} words of at most {MAX_STOP_WORD_BYTES} bytes each, "
            f"got {len(stop_words)} words of up to {max(len(w.encode()) for w in stop_words)} bytes"
        )
    return ParsedRequest(text, params, bool(stream) if stream is not None else False, stop_words)
