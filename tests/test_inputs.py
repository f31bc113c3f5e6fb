"""Parsing and checking one request's Triton inputs (`dlm.inputs`): defaults, and errors naming the input."""

from __future__ import annotations

import json
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


# --- issue 15: the inputs NVIDIA's benchmarking clients send; issue 12: re-masking and the pass cap --------------
def test_min_tokens_under_both_names_and_ignore_eos():
    assert parse(text_input="a").params.min_tokens == 0 and not parse(text_input="a").params.ignore_eos
    assert parse(text_input="a", min_tokens=5).params.min_tokens == 5
    assert parse(text_input="a", min_length=np.array([7], dtype=np.int32)).params.min_tokens == 7  # TensorRT-LLM's
    assert parse(text_input="a", min_length=3, min_tokens=3).params.min_tokens == 3
    assert parse(text_input="a", max_tokens=10, min_tokens=10).params.min_tokens == 10
    assert parse(text_input="a", ignore_eos=True).params.ignore_eos
    assert not parse(text_input="a", ignore_eos=False).params.ignore_eos


def test_exclude_input_in_output():
    assert not parse(text_input="a").echo  # absent: the answer only (DESIGN §5)
    assert not parse(text_input="a", exclude_input_in_output=True).echo
    assert parse(text_input="a", exclude_input_in_output=False).echo


def test_threshold_with_steps_caps_the_passes_per_block():
    assert parse(text_input="a", threshold=0.5, steps=3).params.max_block_passes == 3
    assert parse(text_input="a", threshold=0.5).params.max_block_passes is None
    assert parse(text_input="a", steps=3).params.max_block_passes is None  # fixed steps, no threshold
    assert parse(text_input="a").params.max_block_passes is None  # the defaults: the threshold without a cap
    fixed = Defaults(threshold=None, steps=4)
    p = parse(fixed, text_input="a", threshold=0.7)
    assert (p.params.threshold, p.params.steps, p.params.max_block_passes) == (pytest.approx(0.7), 4, None)
    assert parse(fixed, text_input="a", threshold=0.7, steps=2).params.max_block_passes == 2


def test_remasking_inputs():
    p = parse(text_input="a", remask_threshold=np.array([0.4], dtype=np.float32),
              max_remasks=np.array([0], dtype=np.int32)).params
    assert (p.remask_threshold, p.max_remasks) == (pytest.approx(0.4), 0)
    p = parse(text_input="a").params
    assert (p.remask_threshold, p.max_remasks) == (None, None)


def test_sampling_parameters_map_to_the_inputs():
    document = {"temperature": 0.5, "top_p": "0.9", "top_k": 5, "max_tokens": "16", "min_tokens": "16", "seed": 7,
                "stop": "x", "ignore_eos": "true", "mode": "ar", "block_length": 16, "threshold": 0.8, "steps": 4,
                "remask_threshold": 0.3, "max_remasks": 2}
    r = parse(text_input="a", sampling_parameters=json.dumps(document))
    p = r.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens, p.seed) == (0.5, 0.9, 5, 16, 16, 7)
    assert (p.ignore_eos, p.mode, p.block_length, p.threshold, p.steps, p.max_block_passes) == (
        True, "ar", 16, 0.8, 4, 4)
    assert (p.remask_threshold, p.max_remasks, r.stop_words) == (0.3, 2, ["x"])
    # genai-perf's vLLM request: numbers as strings
    p = parse(text_input="a", sampling_parameters='{"max_tokens": "24", "min_tokens": "24"}').params
    assert (p.max_tokens, p.min_tokens) == (24, 24)
    assert parse(text_input="a", sampling_parameters='{"stop": ["x", "y"]}').stop_words == ["x", "y"]
    # vLLM's "every candidate" and null: not set
    p = parse(text_input="a", sampling_parameters='{"top_k": -1, "seed": null, "ignore_eos": false}').params
    assert (p.top_k, p.seed, p.ignore_eos) == (None, None, False)
    assert parse(text_input="a", sampling_parameters="{}").params == parse(text_input="a").params


def test_a_setting_given_both_ways_must_agree():
    p = parse(text_input="a", max_tokens=np.array([8], dtype=np.int32), sampling_parameters='{"max_tokens": 8}')
    assert p.params.max_tokens == 8
    p = parse(text_input="a", top_p=np.array([0.7], dtype=np.float32), sampling_parameters='{"top_p": 0.7}').params
    assert p.top_p == pytest.approx(0.7)  # compared as FP32
    stop = np.array([b"x"], dtype=np.object_)
    assert parse(text_input="a", stop_words=stop, sampling_parameters='{"stop": "x"}').stop_words == ["x"]
    assert parse(text_input="a", min_length=4, sampling_parameters='{"min_tokens": 4}').params.min_tokens == 4


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"min_tokens": -1}, r"^min_tokens must be in \[0, 64\] \(at most max_tokens\), got -1$"),
        ({"min_tokens": 65}, r"^min_tokens must be in \[0, 64\] \(at most max_tokens\), got 65$"),
        ({"min_length": 9, "max_tokens": 8}, r"^min_length must be in \[0, 8\] \(at most max_tokens\), got 9$"),
        ({"min_length": 3, "min_tokens": 4}, r"^min_length \(3\) and min_tokens \(4\) must agree"),
        ({"remask_threshold": 0.0}, r"^remask_threshold must be in \(0, 1\), got 0.0$"),
        ({"remask_threshold": 1.0}, r"^remask_threshold must be in \(0, 1\), got 1.0$"),
        ({"remask_threshold": math.nan}, r"^remask_threshold must be in \(0, 1\), got nan$"),
        ({"remask_threshold": -math.inf}, r"^remask_threshold must be in \(0, 1\), got -inf$"),
        ({"max_remasks": -1}, r"^max_remasks must be in \[0, 2147483647\], got -1$"),
        ({"sampling_parameters": "{"}, r"^input 'sampling_parameters' is not valid JSON: "),
        ({"sampling_parameters": b"\xff"}, r"^input 'sampling_parameters' is not valid UTF-8"),
        ({"sampling_parameters": "[1, 2]"}, r"^input 'sampling_parameters' must be a JSON object, got list$"),
        ({"sampling_parameters": '{"n": 2}'}, r"^sampling_parameters key 'n' is unknown: expected some of temperature, "),
        ({"sampling_parameters": '{"n": 2, "best_of": 3}'}, r"^sampling_parameters keys 'best_of', 'n' are unknown"),
        ({"sampling_parameters": '{"max_tokens": "many"}'}, r"^sampling_parameters 'max_tokens' must be an integer, "
                                                             r"got \"many\"$"),
        ({"sampling_parameters": '{"max_tokens": 1.5}'}, r"^sampling_parameters 'max_tokens' must be an integer, got 1.5"),
        ({"sampling_parameters": '{"max_tokens": true}'}, r"^sampling_parameters 'max_tokens' must be an integer"),
        ({"sampling_parameters": '{"temperature": [1]}'}, r"^sampling_parameters 'temperature' must be a number"),
        ({"sampling_parameters": '{"ignore_eos": "yes"}'}, r"^sampling_parameters 'ignore_eos' must be true or false"),
        ({"sampling_parameters": '{"stop": [1]}'}, r"^sampling_parameters 'stop' must be a string or a list of str"),
        ({"sampling_parameters": '{"mode": 3}'}, r"^sampling_parameters 'mode' must be a string, got 3$"),
        # each value is held to its input's range, named as the input
        ({"sampling_parameters": '{"max_tokens": 0}'}, r"^max_tokens must be in \[1, 2147483647\], got 0$"),
        ({"sampling_parameters": '{"max_tokens": 8, "min_tokens": 9}'}, r"^min_tokens must be in \[0, 8\]"),
        ({"sampling_parameters": '{"top_k": 65}'}, r"^top_k must be in \[1, 64\], got 65$"),
        ({"sampling_parameters": '{"top_p": 0}'}, r"^top_p must be in \(0, 1\], got 0.0$"),
        ({"sampling_parameters": '{"seed": -1}'}, r"^seed must be in \[0, 18446744073709551615\], got -1$"),
        ({"sampling_parameters": '{"seed": 18446744073709551616}'}, r"^seed must be in \[0, 18446744073709551615\]"),
        ({"sampling_parameters": '{"temperature": NaN}'}, r"^temperature must be a finite number >= 0, got nan$"),
        ({"sampling_parameters": '{"remask_threshold": 1}'}, r"^remask_threshold must be in \(0, 1\), got 1.0$"),
        ({"sampling_parameters": '{"mode": "fast"}'}, r"^mode 'fast' is unknown"),
        ({"sampling_parameters": '{"steps": 33}'}, r"^steps must be in \[1, 32\], got 33$"),
        ({"sampling_parameters": '{"max_tokens": 8}', "max_tokens": 9},
         r"^sampling_parameters 'max_tokens' \(8\) and input 'max_tokens' \(9\) must agree: they set the same thing"),
        ({"sampling_parameters": '{"min_tokens": 2}', "min_length": 3},
         r"^sampling_parameters 'min_tokens' \(2\) and input 'min_length' \(3\) must agree"),
        ({"sampling_parameters": '{"stop": "y"}', "stop_words": np.array([b"x"], dtype=np.object_)},
         r"^sampling_parameters 'stop' \(\[\"y\"\]\) and input 'stop_words' \(\[\"x\"\]\) must agree"),
        ({"sampling_parameters": '{"mode": "ar"}', "mode": "diffusion"},
         r"^sampling_parameters 'mode' \(\"ar\"\) and input 'mode' \(\"diffusion\"\) must agree"),
    ],
)
def test_invalid_new_inputs_are_named_with_their_range(inputs, message):
    with pytest.raises(InvalidInput, match=message):
        parse(text_input="a", **inputs)


def test_draft_adapter_switch():
    assert parse(text_input="a").params.draft_adapter
    assert not parse(text_input="a", draft_adapter=False).params.draft_adapter
    assert not parse(text_input="a", sampling_parameters='{"draft_adapter": false}').params.draft_adapter
