"""Parsing and checking one request's Triton inputs (`dlm.inputs`): defaults, and errors naming the input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlm.inputs import Defaults, InvalidInput, Limits, parse_request

LIMITS = Limits(context=256, max_block_length=128, top_k=64)


def parse(defaults=Defaults(), **inputs):
    arrays = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, (str, bytes)):
            arrays[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        else:
            arrays[name] = np.array([value])
    return parse_request(arrays.get, defaults, LIMITS, block_size=32)


def test_defaults_apply_to_left_out_inputs():
    r = parse(text_input="4821+377=")
    assert r.text == "4821+377=" and not r.stream and r.stop_words == []
    p = r.params
    assert (p.mode, p.max_tokens, p.threshold, p.steps, p.temperature, p.block_length) == (
        "diffusion", 64, 0.9, 8, 0.0, None)
    assert (p.seed, p.top_k, p.top_p, p.logprobs) == (None, None, None, None)  # no seed: a fresh one per request


def test_steps_without_threshold_means_fixed_steps():
    p = parse(text_input="a", steps=4).params
    assert p.threshold is None and p.steps == 4
    p = parse(text_input="a", steps=4, threshold=0.5).params
    assert p.threshold == 0.5 and p.steps == 4


def test_every_input_is_read():
    stop = np.array([b"X", b"YZ"], dtype=np.object_)
    r = parse(text_input="a", mode="speculative", max_tokens=10, stream=True, temperature=0.5, seed=3,
              block_length=16, stop_words=stop)
    assert r.stream and r.stop_words == ["X", "YZ"]
    assert (r.params.mode, r.params.max_tokens, r.params.temperature, r.params.seed, r.params.block_length) == (
        "speculative", 10, 0.5, 3, 16)


def test_sampling_controls_and_log_probs_are_read():
    p = parse(text_input="a", top_k=np.array([5], dtype=np.int32), top_p=np.array([0.5], dtype=np.float32)).params
    assert (p.top_k, p.top_p, p.logprobs) == (5, 0.5, None)
    assert parse(text_input="a", top_k=64, top_p=1.0).params.top_k == 64
    assert parse(text_input="a", return_log_probs=True).params.logprobs == 0
    assert parse(text_input="a", return_log_probs=False).params.logprobs is None
    assert parse(text_input="a", return_log_probs=True, top_logprobs=3).params.logprobs == 3
    assert parse(text_input="a", top_logprobs=20).params.logprobs == 20  # alternatives imply log probs
    assert parse(text_input="a", top_logprobs=0).params.logprobs is None


def test_top_logprobs_is_bounded_by_a_smaller_engine_k():
    small = Limits(context=256, max_block_length=128, top_k=8)
    with pytest.raises(InvalidInput, match=r"^top_logprobs must be in \[0, 8\], got 9$"):
        parse_request({"text_input": np.array([b"a"], dtype=np.object_), "top_logprobs": np.array([9])}.get,
                      Defaults(), small, block_size=32)
    with pytest.raises(InvalidInput, match=r"^top_k must be in \[1, 8\], got 9$"):
        parse_request({"text_input": np.array([b"a"], dtype=np.object_), "top_k": np.array([9])}.get,
                      Defaults(), small, block_size=32)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "input 'text_input' is missing"),
        ({"text_input": ""}, "input 'text_input' is empty"),
        ({"text_input": b"\xff\xfe"}, "input 'text_input' is not valid UTF-8"),
        ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, r"'text_input' must hold exactly one value"),
        ({"text_input": "a", "mode": "fast"}, "mode 'fast' is unknown: expected one of ar, diffusion, speculative"),
        ({"text_input": "a", "threshold": 0.0}, r"threshold must be in \(0, 1\], got 0.0"),
        ({"text_input": "a", "threshold": 1.5}, r"threshold must be in \(0, 1\]"),
        ({"text_input": "a", "threshold": math.nan}, r"threshold must be in \(0, 1\], got nan"),
        ({"text_input": "a", "steps": 0}, r"steps must be in \[1, 32\], got 0"),
        ({"text_input": "a", "steps": 33}, r"steps must be in \[1, 32\]"),
        ({"text_input": "a", "block_length": 1}, r"block_length must be in \[2, 128\], got 1"),
        ({"text_input": "a", "block_length": 129}, r"block_length must be in \[2, 128\]"),
        ({"text_input": "a", "max_tokens": 0}, r"max_tokens must be in \[1, 2147483647\], got 0"),
        ({"text_input": "a", "max_tokens": 224}, r"max_tokens must be in \[1, 223\]"),
        ({"text_input": "a" * 16385}, "input 'text_input' is 16385 bytes, more than the 16384"),
        ({"text_input": "a", "stop_words": np.array([b"x"] * 17, dtype=np.object_)}, "at most 16 words"),
        ({"text_input": "a", "stop_words": np.array([b"x" * 257], dtype=np.object_)}, "of at most 256 bytes"),
        ({"text_input": "a", "temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"text_input": "a", "temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"text_input": "a", "top_k": 0}, r"^top_k must be in \[1, 64\], got 0$"),
        ({"text_input": "a", "top_k": 65}, r"^top_k must be in \[1, 64\], got 65$"),
        ({"text_input": "a", "top_k": -(2**31)}, r"^top_k must be in \[1, 64\], got -2147483648$"),
        ({"text_input": "a", "top_p": 0.0}, r"^top_p must be in \(0, 1\], got 0.0$"),
        ({"text_input": "a", "top_p": 1.5}, r"^top_p must be in \(0, 1\], got 1.5$"),
        ({"text_input": "a", "top_p": -0.1}, r"^top_p must be in \(0, 1\]"),
        ({"text_input": "a", "top_p": math.nan}, r"^top_p must be in \(0, 1\], got nan$"),
        ({"text_input": "a", "top_p": math.inf}, r"^top_p must be in \(0, 1\], got inf$"),
        ({"text_input": "a", "top_logprobs": 21}, r"^top_logprobs must be in \[0, 20\], got 21$"),
        ({"text_input": "a", "top_logprobs": -1}, r"^top_logprobs must be in \[0, 20\], got -1$"),
        ({"text_input": "a", "top_k": np.array([1, 2])}, r"^input 'top_k' must hold exactly one value"),
    ],
)
def test_invalid_inputs_are_named_with_their_range(inputs, message):
    with pytest.raises(InvalidInput, match=message):
        parse(**inputs)


def test_defaults_from_config_parameters():
    d = Defaults.from_parameters({"default_mode": "ar", "max_tokens": "32", "threshold": "", "steps": "4",
                                  "block_length": "16"})
    assert (d.mode, d.max_tokens, d.threshold, d.steps, d.block_length) == ("ar", 32, None, 4, 16)
    with pytest.raises(ValueError, match="parameter max_tokens = 'many' is not a valid int"):
        Defaults.from_parameters({"max_tokens": "many"})
    with pytest.raises(ValueError, match="mode 'x' is unknown"):
        Defaults.from_parameters({"default_mode": "x"})
