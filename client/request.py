"""One generation request as the `dlm` model's inputs (DESIGN §5): the tensors for gRPC, the JSON body for HTTP.

Only the options a caller sets are sent; the server fills in the rest from its `config.pbtxt` defaults and checks
every value (an out-of-range one comes back as the server's error, never a local guess).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import json

import numpy as np

from client.result import InvalidRequest

MODES = ("diffusion", "ar", "speculative")

# input name -> numpy dtype of its tensor (config.pbtxt's TYPE_STRING is BYTES: numpy object arrays of bytes)
INPUT_DTYPES: dict[str, Any] = {
    "text_input": np.object_,
    "max_tokens": np.int32,
    "stream": np.bool_,
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "seed": np.uint64,
    "stop_words": np.object_,
    "mode": np.object_,
    "block_length": np.int32,
    "threshold": np.float32,
    "steps": np.int32,
    "return_log_probs": np.bool_,
    "top_logprobs": np.int32,
    "remask_threshold": np.float32,
    "max_remasks": np.int32,
    "min_tokens": np.int32,
    "min_length": np.int32,
    "ignore_eos": np.bool_,
    "draft_adapter": np.bool_,
    "frequency_penalty": np.float32,
    "presence_penalty": np.float32,
    "repetition_penalty": np.float32,
    "guided_decoding_guide_type": np.object_,
    "guided_decoding_guide": np.object_,
    "exclude_input_in_output": np.bool_,
    "add_special_tokens": np.bool_,
    "sampling_parameters": np.object_,
}


@dataclass(frozen=True)
class Options:
    """The optional inputs of one request; None leaves an input out (the server's default applies)."""

    mode: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None  # sample among the k best of the engine's candidates
    top_p: float | None = None  # sample among the fewest best candidates whose probability reaches top_p
    seed: int | None = None  # None: the server draws a fresh seed for this request
    stop_words: tuple[str, ...] | list[str] | None = None
    block_length: int | None = None
    threshold: float | None = None
    steps: int | None = None
    return_log_probs: bool | None = None  # each generated token's log prob and raw bytes (`Result.tokens`)
    top_logprobs: int | None = None  # and its n best alternatives (n > 0 implies return_log_probs)
    remask_threshold: float | None = None  # diffusion: re-mask a committed token whose confidence falls below this
    max_remasks: int | None = None  # and at most this many per block (absent: the block length)
    min_tokens: int | None = None  # no end token before this many tokens
    min_length: int | None = None  # TensorRT-LLM's name for min_tokens
    ignore_eos: bool | None = None  # no end token at all: decode to max_tokens
    draft_adapter: bool | None = None  # speculative: False drafts with the base weights, not the draft-only LoRA
    frequency_penalty: float | None = None  # [-2, 2], per occurrence in the answer so far (OpenAI's)
    presence_penalty: float | None = None  # [-2, 2], once a token occurs in the answer (OpenAI's)
    repetition_penalty: float | None = None  # (0, 2], tokens of the prompt and answer (vLLM's)
    guided_decoding_guide_type: str | None = None  # json, json_schema, regex or lark (TensorRT-LLM's name)
    guided_decoding_guide: str | None = None  # the schema (JSON text), regular expression or Lark grammar
    exclude_input_in_output: bool | None = None  # False: the prompt's text comes before the answer
    add_special_tokens: bool | None = None  # False: the prompt is a rendered chat template (its BOS is written)
    sampling_parameters: str | dict[str, Any] | None = None  # vLLM's JSON of settings (a dict is written as JSON)

    @classmethod
    def of(cls, **options: Any) -> "Options":
        """Options from keyword arguments, refusing names the model has no input for."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected some of {', '.join(sorted(known))}")
        return cls(**options)

    def values(self) -> dict[str, Any]:
        """The options that are set, by input name."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if "stop_words" in out:
            out["stop_words"] = [out["stop_words"]] if isinstance(out["stop_words"], str) else list(out["stop_words"])
            if not out["stop_words"]:
                del out["stop_words"]
        if isinstance(out.get("sampling_parameters"), dict):
            out["sampling_parameters"] = json.dumps(out["sampling_parameters"])
        return out


def tensors(prompt: str, options: Options, stream: bool) -> dict[str, np.ndarray]:
    """The request's input tensors by name (shape [1], stop_words [n]). An integer its input's dtype cannot hold
    raises `InvalidRequest` (numpy would wrap it around, sending another value)."""
    values = {"text_input": prompt, **options.values(), "stream": stream}
    out = {}
    for name, value in values.items():
        dtype = INPUT_DTYPES[name]
        items = value if isinstance(value, list) else [value]
        if dtype is np.object_:
            items = [str(v).encode("utf-8") for v in items]
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            for v in items:
                if not info.min <= v <= info.max:
                    raise InvalidRequest(f"{name} must be in [{info.min}, {info.max}] ({np.dtype(dtype).name}), "
                                         f"got {v}")
        out[name] = np.array(items, dtype=dtype)
    return out


def json_body(prompt: str, options: Options, stream: bool) -> dict[str, Any]:
    """The body of Triton's `/generate` and `/generate_stream` (inputs by name, scalars as JSON values)."""
    return {"text_input": prompt, **options.values(), "stream": stream}
