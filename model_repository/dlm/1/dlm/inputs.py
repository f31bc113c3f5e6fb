"""The Triton model contract's inputs (DESIGN §5): defaults from `config.pbtxt` parameters, and one request's
tensors parsed and checked into what the scheduler needs. Every refusal is an `InvalidInput` that names the input
and what it allows, so Triton can send it back as the request's error."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dlm.penalties import FREQUENCY_RANGE, PRESENCE_RANGE, REPETITION_RANGE
from dlm.refine import MODES, GenerationParams

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
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
    echo: bool = False  # exclude_input_in_output false: the prompt's text comes before the answer
    # false: the prompt is a rendered chat template, whose special tokens the template wrote (vLLM's name)
    add_special_tokens: bool = True
    # guided decoding (TensorRT-LLM's names): (guided_decoding_guide_type, guided_decoding_guide), compiled by the
    # model against its tokenizer (dlm.grammar)
    guide: tuple[str, str] | None = None


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


def _integer(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    number = int(value)
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be in [{low}, {high}]{why}, got {number}")
    return number


def _unit(name: str, value: Any, closed: bool) -> float:
    """A probability-like FP32 input: in (0, 1] when `closed`, else (0, 1); NaN and infinities refused."""
    number = float(value)
    if not (0.0 < number < 1.0 or closed and number == 1.0):  # NaN fails this too
        raise InvalidInput(f"{name} must be in (0, {'1]' if closed else '1)'}, got {number}")
    return number


GUIDE_TYPES = ("json", "json_schema", "regex", "lark")
MAX_GUIDE_BYTES = 1 << 16


def _guide(guide_type: Any, guide: Any) -> tuple[str, str] | None:
    """TensorRT-LLM's guided decoding inputs: a type (json: any JSON object, json_schema, regex, lark) and the guide
    (a schema, a regular expression or a Lark grammar; none for json). Compiled later, against the tokenizer."""
    if guide_type is None:
        if guide is not None:
            raise InvalidInput("input 'guided_decoding_guide' needs 'guided_decoding_guide_type' (one of "
                               f"{', '.join(GUIDE_TYPES)})")
        return None
    kind = _text("guided_decoding_guide_type", guide_type)
    if kind not in GUIDE_TYPES:
        raise InvalidInput(f"guided_decoding_guide_type '{kind}' is unknown: expected one of {', '.join(GUIDE_TYPES)}")
    text = "" if guide is None else _text("guided_decoding_guide", guide)
    if kind != "json" and not text.strip():
        raise InvalidInput(f"guided_decoding_guide_type '{kind}' needs input 'guided_decoding_guide' (the "
                           f"{'schema' if kind == 'json_schema' else 'regular expression' if kind == 'regex' else 'grammar'})")
    if len(text.encode()) > MAX_GUIDE_BYTES:
        raise InvalidInput(f"guided_decoding_guide is {len(text.encode())} bytes, more than {MAX_GUIDE_BYTES}")
    return kind, text


def _penalty(name: str, value: Any, default: float) -> float:
    """A penalty in its range (`dlm.penalties`: frequency and presence in [-2, 2], repetition in (0, 2])."""
    if value is None:
        return default
    number = float(value)
    low, high = {"frequency_penalty": FREQUENCY_RANGE, "presence_penalty": PRESENCE_RANGE}.get(name, REPETITION_RANGE)
    if name == "repetition_penalty":
        if not low < number <= high:  # NaN fails this too
            raise InvalidInput(f"{name} must be in ({low:g}, {high:g}], got {number}")
    elif not low <= number <= high:
        raise InvalidInput(f"{name} must be in [{low:g}, {high:g}], got {number}")
    return number


# vLLM's `sampling_parameters` (a JSON object): each key it may hold, the input it stands for, and its JSON kind.
# vLLM's own backend sends numbers as strings too ("max_tokens": "16", as genai-perf writes them): a string that
# spells a value of the key's kind is read as that value. null leaves a key out.
SAMPLING_KEYS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "float"), "top_p": ("top_p", "float"), "top_k": ("top_k", "int"),
    "max_tokens": ("max_tokens", "int"), "min_tokens": ("min_tokens", "int"), "seed": ("seed", "int"),
    "stop": ("stop_words", "words"), "ignore_eos": ("ignore_eos", "bool"),
    # the DLM controls
    "mode": ("mode", "text"), "block_length": ("block_length", "int"), "threshold": ("threshold", "float"),
    "steps": ("steps", "int"), "remask_threshold": ("remask_threshold", "float"),
    "max_remasks": ("max_remasks", "int"), "draft_adapter": ("draft_adapter", "bool"),
    # penalties on the engine's candidates (dlm.penalties)
    "frequency_penalty": ("frequency_penalty", "float"), "presence_penalty": ("presence_penalty", "float"),
    "repetition_penalty": ("repetition_penalty", "float"),
}
# an input's values compared in its tensor's dtype, so 0.7 as JSON equals 0.7 as FP32
FP32_INPUTS = frozenset({"temperature", "top_p", "threshold", "remask_threshold", "frequency_penalty",
                         "presence_penalty", "repetition_penalty"})


def _json_value(key: str, kind: str, value: Any) -> Any:
    where = f"sampling_parameters '{key}'"
    if kind == "words":
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InvalidInput(f"{where} must be a string or a list of strings, got {json.dumps(value)}")
        return words
    if kind == "text":
        if not isinstance(value, str):
            raise InvalidInput(f"{where} must be a string, got {json.dumps(value)}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise InvalidInput(f"{where} must be true or false, got {json.dumps(value)}")
    if isinstance(value, str):  # a number written as a string
        try:
            value = json.loads(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, got {json.dumps(value)}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise InvalidInput(f"{where} must be an integer, got {value}")
        return int(value)
    return float(value)


def sampling_parameters(raw: Any) -> dict[str, Any]:
    """vLLM's `sampling_parameters` JSON as {input name: value}; an unknown key is refused by name."""
    text = _text("sampling_parameters", raw)
    try:
        document = json.loads(text)
    except ValueError as e:
        raise InvalidInput(f"input 'sampling_parameters' is not valid JSON: {e}") from e
    if not isinstance(document, dict):
        raise InvalidInput(f"input 'sampling_parameters' must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - set(SAMPLING_KEYS))
    if unknown:
        which = f"key {unknown[0]!r} is" if len(unknown) == 1 else f"keys {', '.join(map(repr, unknown))} are"
        raise InvalidInput(f"sampling_parameters {which} unknown: expected some of {', '.join(SAMPLING_KEYS)}")
    out = {}
    for key, value in document.items():
        if value is None:
            continue
        name, kind = SAMPLING_KEYS[key]
        value = _json_value(key, kind, value)
        if key == "top_k" and value in (-1, 0):
            continue  # vLLM's "every candidate"
        out[name] = value
    return out


def _same(name: str, a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return list(a) == list(b)
    if name in FP32_INPUTS:
        with np.errstate(over="ignore"):
            x, y = np.float32(a), np.float32(b)
        return bool(x == y or (np.isnan(x) and np.isnan(y)))
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) == int(b)
    return bool(a == b)


def parse_request(
    get: Callable[[str], np.ndarray | None], defaults: Defaults, limits: Limits, block_size: int
) -> ParsedRequest:
    """`get(name)` returns an input's array, or None when the request left it out. A setting may also come in
    `sampling_parameters` (vLLM's JSON); given both ways, the two values must agree."""
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

    tensors: dict[str, Any] = {}

    def tensor(name: str) -> Any:
        if name not in tensors:
            array = get(name)
            tensors[name] = None if array is None else _one(name, array)
        return tensors[name]

    # TensorRT-LLM's min_length and vLLM's min_tokens: one setting under two names
    length, minimum = tensor("min_length"), tensor("min_tokens")
    if length is not None and minimum is not None and int(length) != int(minimum):
        raise InvalidInput(f"min_length ({int(length)}) and min_tokens ({int(minimum)}) must agree: they are "
                           "TensorRT-LLM's and vLLM's names for one setting (give one)")
    min_name = "min_length" if length is not None else "min_tokens"
    tensors["min_tokens"] = minimum if minimum is not None else length

    raw_json = get("sampling_parameters")
    from_json = {} if raw_json is None else sampling_parameters(_one("sampling_parameters", raw_json))
    stop = get("stop_words")
    for name, json_value in from_json.items():
        given = (None if stop is None else [_text("stop_words", w) for w in stop.reshape(-1)]) \
            if name == "stop_words" else tensor(name)
        if given is None:
            continue
        if name != "stop_words" and isinstance(given, (bytes, np.bytes_)):
            given = _text(name, given)
        if not _same(name, given, json_value):
            key = next(k for k, (n, _) in SAMPLING_KEYS.items() if n == name)
            shown = given.tolist() if hasattr(given, "tolist") else given
            input_name = min_name if name == "min_tokens" else name
            raise InvalidInput(
                f"sampling_parameters '{key}' ({json.dumps(json_value)}) and input '{input_name}' "
                f"({json.dumps(shown)}) must agree: they set the same thing (give it once)"
            )
        if name == "min_tokens":
            min_name = "min_tokens"

    def value(name: str) -> Any:
        given = tensor(name)
        return from_json.get(name) if given is None else given

    guide = _guide(tensor("guided_decoding_guide_type"), tensor("guided_decoding_guide"))
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
    min_tokens = value("min_tokens")
    min_tokens = 0 if min_tokens is None else _integer(min_name, min_tokens, 0, max_tokens, " (at most max_tokens)")
    ignore_eos = value("ignore_eos")

    # threshold alone: commit by confidence; steps alone: that many passes per block; both: commit by confidence
    # with at most `steps` passes per block (the last commits what is left)
    threshold, steps = value("threshold"), value("steps")
    max_block_passes = None
    if threshold is not None:
        threshold = _unit("threshold", threshold, closed=True)
    elif steps is None:
        threshold = defaults.threshold
    if steps is not None:
        steps = _integer("steps", steps, 1, block)
        max_block_passes = steps if threshold is not None else None
    else:
        steps = defaults.steps

    remask_threshold, max_remasks = value("remask_threshold"), value("max_remasks")
    if remask_threshold is not None:
        remask_threshold = _unit("remask_threshold", remask_threshold, closed=False)
    if max_remasks is not None:
        max_remasks = _integer("max_remasks", max_remasks, 0, INT32_MAX)

    temperature = value("temperature")
    temperature = 0.0 if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature}")

    top_k = value("top_k")
    top_k = None if top_k is None else _integer("top_k", top_k, 1, limits.top_k)
    top_p = value("top_p")
    top_p = None if top_p is None else _unit("top_p", top_p, closed=True)

    return_log_probs, top_logprobs = value("return_log_probs"), value("top_logprobs")
    top_logprobs = 0 if top_logprobs is None else _integer("top_logprobs", top_logprobs, 0, limits.max_top_logprobs)
    logprobs = top_logprobs if top_logprobs > 0 or (return_log_probs is not None and bool(return_log_probs)) else None

    frequency_penalty, presence_penalty, repetition_penalty = (
        _penalty(name, value(name), default) for name, default in
        (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0)))

    seed = value("seed")
    seed = None if seed is None else _integer("seed", seed, 0, UINT64_MAX)
    draft_adapter = value("draft_adapter")
    stream, exclude = value("stream"), value("exclude_input_in_output")
    add_special_tokens = tensor("add_special_tokens")
    params = GenerationParams(
        mode=mode, max_tokens=max_tokens, block_length=block_length, threshold=threshold, steps=steps,
        temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, logprobs=logprobs,
        min_tokens=min_tokens, ignore_eos=bool(ignore_eos) if ignore_eos is not None else False,
        max_block_passes=max_block_passes, remask_threshold=remask_threshold, max_remasks=max_remasks,
        draft_adapter=True if draft_adapter is None else bool(draft_adapter),
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
    )
    if stop is not None:
        stop_words = [_text("stop_words", w) for w in stop.reshape(-1)]
    else:
        stop_words = list(from_json.get("stop_words", []))
    if len(stop_words) > MAX_STOP_WORDS or any(len(w.encode()) > MAX_STOP_WORD_BYTES for w in stop_words):
        raise InvalidInput(
            f"stop_words allows at most {MAX_STOP_WORDS} words of at most {MAX_STOP_WORD_BYTES} bytes each, "
            f"got {len(stop_words)} words of up to {max(len(w.encode()) for w in stop_words)} bytes"
        )
    if guide is not None and params.ignore_eos:
        raise InvalidInput("ignore_eos cannot be combined with guided decoding: the grammar decides where the "
                           "answer ends")
    if guide is not None and params.min_tokens:
        raise InvalidInput("min_tokens cannot be combined with guided decoding: the grammar decides where the "
                           "answer ends")
    if guide is not None and params.remask_threshold is not None:
        raise InvalidInput("remask_threshold cannot be combined with guided decoding: a constrained block is "
                           "committed left to right and never re-masked")
    return ParsedRequest(text, params, bool(stream) if stream is not None else False, stop_words, guide=guide,
                         echo=exclude is not None and not bool(exclude),
                         add_special_tokens=True if add_special_tokens is None else bool(add_special_tokens))
