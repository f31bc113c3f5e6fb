"""`dlm.inputs` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: range
bounds that are inclusive, the config.pbtxt defaults and their validation, inputs with a batch dimension, refusals
worded exactly (the text a client sees), JSON values beside their inputs, and values that reach GenerationParams."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest

from dlm.inputs import Defaults, InvalidInput, Limits, ParsedRequest, parse_request

LIMITS = Limits(context=256, max_block_length=128, top_k=64)


def array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes)):
        return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
    return np.array([value])


def parse(defaults: Defaults = Defaults(), **inputs: Any) -> ParsedRequest:
    arrays = {name: array(value) for name, value in inputs.items()}
    return parse_request(arrays.get, defaults, LIMITS, block_size=32)


def refused(message: str, defaults: Defaults = Defaults(), **inputs: Any) -> None:
    """The request is refused with exactly `message` (a regular expression matched in full)."""
    with pytest.raises(InvalidInput) as raised:
        parse(defaults, **inputs)
    assert re_full(message, str(raised.value)), str(raised.value)


def re_full(pattern: str, text: str) -> bool:
    import re

    return re.fullmatch(pattern, text) is not None


# --- bounds -------------------------------------------------------------------------------------------------------
def test_range_bounds_are_inclusive() -> None:
    assert parse(text_input="a", block_length=2).params.block_length == 2
    assert parse(text_input="a", block_length=128).params.block_length == 128
    assert parse(text_input="a", max_tokens=223).params.max_tokens == 223  # 256 - one block of 32 - 1
    assert parse(text_input="a" * 16384).text == "a" * 16384  # 64 bytes per position of the 256
    assert parse(text_input="a", stop_words=np.array([b"x"] * 16, dtype=np.object_)).stop_words == ["x"] * 16
    assert parse(text_input="a", stop_words=np.array([b"x" * 256], dtype=np.object_)).stop_words == ["x" * 256]
    assert parse(text_input="a", seed=np.array([2**64 - 1], dtype=np.uint64)).params.seed == 2**64 - 1


# --- config.pbtxt defaults ----------------------------------------------------------------------------------------
def test_no_parameters_give_the_built_in_defaults() -> None:
    assert Defaults.from_parameters({}) == Defaults() == Defaults("diffusion", 64, None, 0.9, 8)


def test_each_default_parameter_is_read_and_validated() -> None:
    assert Defaults.from_parameters({"threshold": "0.5"}).threshold == 0.5
    assert Defaults.from_parameters({"threshold": " "}).threshold is None  # given empty: fixed steps
    for parameters, message in [({"block_length": "1"}, "block_length must be at least 2, got 1"),
                                ({"threshold": "1.5"}, r"threshold must be in \(0, 1\], got 1.5"),
                                ({"steps": "0"}, "steps must be at least 1, got 0"),
                                ({"max_tokens": "0"}, "max_tokens must be at least 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            Defaults.from_parameters(parameters)


def test_the_default_block_length_applies_to_a_request_without_one() -> None:
    assert parse(Defaults(block_length=16), text_input="a").params.block_length == 16
    assert parse(Defaults(block_length=16), text_input="a", block_length=8).params.block_length == 8


# --- the tensors' shapes ------------------------------------------------------------------------------------------
def test_inputs_with_a_batch_dimension() -> None:
    stop = np.array([[b"x", b"yz"]], dtype=np.object_)  # [1, 2]
    r = parse(text_input=np.array([[b"hi"]], dtype=np.object_), max_tokens=np.array([[8]], dtype=np.int32),
              stop_words=stop)
    assert (r.text, r.params.max_tokens, r.stop_words) == ("hi", 8, ["x", "yz"])
    r = parse(text_input="hi", stop_words=stop, sampling_parameters='{"stop": ["x", "yz"]}')
    assert r.stop_words == ["x", "yz"]


# --- refusals, word for word --------------------------------------------------------------------------------------
def test_refusals_of_the_prompt_are_worded_exactly() -> None:
    refused(r"input 'text_input' is missing: send the prompt as BYTES")
    refused(r"input 'text_input' is empty: send a prompt of at least one character", text_input="")
    refused(r"input 'sampling_parameters' must hold exactly one value, got shape \[2\]", text_input="a",
            sampling_parameters=np.array([b"{}", b"{}"], dtype=np.object_))


def test_an_input_of_the_wrong_type_or_encoding_is_named() -> None:
    refused(r"input 'mode' must be BYTES \(UTF-8 text\), got int64", text_input="a", mode=np.array([3]))
    refused(r"input 'mode' is not valid UTF-8 \(invalid start byte at byte 0\)", text_input="a", mode=b"\xff",
            sampling_parameters='{"mode": "ar"}')
    bad = np.array([b"\xff"], dtype=np.object_)
    refused(r"input 'stop_words' is not valid UTF-8 \(invalid start byte at byte 0\)", text_input="a", stop_words=bad)
    refused(r"input 'stop_words' is not valid UTF-8 \(invalid start byte at byte 0\)", text_input="a", stop_words=bad,
            sampling_parameters='{"stop": "x"}')


def test_min_length_and_min_tokens_are_refused_under_the_name_given() -> None:
    refused(r"min_length \(3\) and min_tokens \(4\) must agree: they are TensorRT-LLM's and vLLM's names for one "
            r"setting \(give one\)", text_input="a", min_length=3, min_tokens=4)
    # min_length as a tensor, min_tokens in the JSON: the range is named as the JSON says
    refused(r"min_tokens must be in \[0, 8\] \(at most max_tokens\), got 9", text_input="a", max_tokens=8,
            min_length=9, sampling_parameters='{"min_tokens": 9}')
    # another setting given both ways leaves the tensor's name
    refused(r"min_length must be in \[0, 8\] \(at most max_tokens\), got 9", text_input="a", max_tokens=8,
            min_length=9, temperature=np.array([0.5], dtype=np.float32), sampling_parameters='{"temperature": 0.5}')


def test_json_refusals_show_the_value() -> None:
    refused(r"sampling_parameters 'stop' must be a string or a list of strings, got \[1\]", text_input="a",
            sampling_parameters='{"stop": [1]}')
    refused(r'sampling_parameters \'ignore_eos\' must be true or false, got "yes"', text_input="a",
            sampling_parameters='{"ignore_eos": "yes"}')


# --- sampling_parameters (vLLM's JSON) ----------------------------------------------------------------------------
def test_json_booleans_may_be_strings_either_way() -> None:
    assert parse(text_input="a", sampling_parameters='{"ignore_eos": "true"}').params.ignore_eos
    assert not parse(text_input="a", sampling_parameters='{"ignore_eos": " False "}').params.ignore_eos
    assert not parse(text_input="a", sampling_parameters='{"draft_adapter": "false"}').params.draft_adapter


def test_a_null_or_every_candidate_top_k_leaves_only_that_key_out() -> None:
    p = parse(text_input="a", sampling_parameters='{"seed": null, "temperature": 0.5}').params
    assert (p.seed, p.temperature) == (None, 0.5)
    p = parse(text_input="a", sampling_parameters='{"top_k": -1, "temperature": 0.5}').params
    assert (p.top_k, p.temperature) == (None, 0.5)
    assert parse(text_input="a", sampling_parameters='{"top_k": 0}').params.top_k is None
    assert parse(text_input="a", sampling_parameters='{"top_k": 1}').params.top_k == 1


def test_every_setting_given_both_ways_is_compared() -> None:
    # the first key has no tensor beside it; the second disagrees with its tensor
    refused(r"sampling_parameters 'top_p' \(0.9\) and input 'top_p' \(0.5\) must agree: they set the same thing "
            r"\(give it once\)", text_input="a", top_p=np.array([0.5], dtype=np.float32),
            sampling_parameters='{"temperature": 0.5, "top_p": 0.9}')


def test_equal_values_given_both_ways_agree() -> None:
    r = parse(text_input="a", mode="ar", ignore_eos=True, draft_adapter=False,
              sampling_parameters='{"mode": "ar", "ignore_eos": true, "draft_adapter": false}')
    assert (r.params.mode, r.params.ignore_eos, r.params.draft_adapter) == ("ar", True, False)


def test_fp32_values_given_both_ways_nan_included() -> None:
    refused(r"sampling_parameters 'top_p' \(NaN\) and input 'top_p' \(0.5\) must agree: they set the same thing "
            r"\(give it once\)", text_input="a", top_p=np.array([0.5], dtype=np.float32),
            sampling_parameters='{"top_p": NaN}')
    refused(r"sampling_parameters 'top_p' \(0.5\) and input 'top_p' \(NaN\) must agree: they set the same thing "
            r"\(give it once\)", text_input="a", top_p=np.array([math.nan], dtype=np.float32),
            sampling_parameters='{"top_p": 0.5}')
    # NaN both ways agrees, and is then refused by its range
    refused(r"top_p must be in \(0, 1\], got nan", text_input="a", top_p=np.array([math.nan], dtype=np.float32),
            sampling_parameters='{"top_p": NaN}')


def test_a_json_number_beyond_fp32_is_compared_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning in the comparison would be raised here
        refused(r"temperature must be a finite number >= 0, got inf", text_input="a",
                temperature=np.array([np.inf], dtype=np.float32), sampling_parameters='{"temperature": 1e39}')


# --- what reaches GenerationParams and ParsedRequest --------------------------------------------------------------
def test_every_value_reaches_the_request() -> None:
    r = parse(text_input="a", temperature=np.array([0.7], dtype=np.float32), top_p=np.array([0.5], dtype=np.float32),
              threshold=np.array([0.6], dtype=np.float32), steps=np.array([4], dtype=np.int32),
              remask_threshold=np.array([0.3], dtype=np.float32), max_remasks=np.array([2], dtype=np.int32),
              draft_adapter=True, top_logprobs=np.array([1], dtype=np.int32))
    p = r.params
    assert (p.temperature, p.top_p, p.threshold, p.remask_threshold) == pytest.approx((0.7, 0.5, 0.6, 0.3))
    assert (p.steps, p.max_block_passes, p.max_remasks, p.draft_adapter, p.logprobs) == (4, 4, 2, True, 1)


def test_add_special_tokens() -> None:
    assert parse(text_input="a").add_special_tokens is True  # absent: the prompt is plain text
    assert parse(text_input="a", add_special_tokens=False).add_special_tokens is False
    assert parse(text_input="a", add_special_tokens=True).add_special_tokens is True


def test_json_stop_words_apply_without_a_tensor() -> None:
    assert parse(text_input="a", sampling_parameters=json.dumps({"stop": ["x", "y"]})).stop_words == ["x", "y"]


# --- guided decoding (guided_decoding_guide_type, guided_decoding_guide) ------------------------------------------
SCHEMA = '{"type": "object"}'


def test_each_guide_type_reaches_the_request_with_its_guide() -> None:
    assert parse(text_input="a").guide is None
    assert parse(text_input="a", guided_decoding_guide_type="json").guide == ("json", "")  # any JSON object
    assert parse(text_input="a", guided_decoding_guide_type="json",
                 guided_decoding_guide=SCHEMA).guide == ("json", SCHEMA)
    for kind, guide in [("json_schema", SCHEMA), ("regex", "[0-9]+"), ("lark", 'start: "x"')]:
        assert parse(text_input="a", guided_decoding_guide_type=kind,
                     guided_decoding_guide=guide).guide == (kind, guide)


def test_a_guide_without_its_type_or_of_an_unknown_type_is_refused_with_the_types() -> None:
    refused(r"input 'guided_decoding_guide' needs 'guided_decoding_guide_type' \(one of json, json_schema, regex, "
            r"lark\)", text_input="a", guided_decoding_guide=SCHEMA)
    refused(r"guided_decoding_guide_type 'yaml' is unknown: expected one of json, json_schema, regex, lark",
            text_input="a", guided_decoding_guide_type="yaml", guided_decoding_guide=SCHEMA)
    refused(r"guided_decoding_guide_type 'JSON' is unknown: expected one of json, json_schema, regex, lark",
            text_input="a", guided_decoding_guide_type="JSON")


def test_guide_inputs_that_are_not_utf8_are_named() -> None:
    refused(r"input 'guided_decoding_guide_type' is not valid UTF-8 \(invalid start byte at byte 0\)",
            text_input="a", guided_decoding_guide_type=b"\xff", guided_decoding_guide=SCHEMA)
    refused(r"input 'guided_decoding_guide' is not valid UTF-8 \(invalid start byte at byte 0\)",
            text_input="a", guided_decoding_guide_type="regex", guided_decoding_guide=b"\xff")


@pytest.mark.parametrize("kind, what", [("json_schema", "schema"), ("regex", "regular expression"),
                                        ("lark", "grammar")])
def test_a_guide_type_other_than_json_needs_a_guide_that_is_not_blank(kind: str, what: str) -> None:
    message = rf"guided_decoding_guide_type '{kind}' needs input 'guided_decoding_guide' \(the {what}\)"
    refused(message, text_input="a", guided_decoding_guide_type=kind)
    refused(message, text_input="a", guided_decoding_guide_type=kind, guided_decoding_guide=" \n")


def test_a_guide_may_hold_64_kib_of_utf8() -> None:
    most = "é" * (1 << 15)  # 65,536 bytes in 32,768 characters
    assert parse(text_input="a", guided_decoding_guide_type="regex", guided_decoding_guide=most).guide == \
        ("regex", most)
    refused(r"guided_decoding_guide is 65537 bytes, more than 65536", text_input="a",
            guided_decoding_guide_type="regex", guided_decoding_guide=most + "x")


# --- penalties ----------------------------------------------------------------------------------------------------
def test_penalty_ranges_include_their_ends_but_repetitions_zero() -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        for end in (-2.0, 2.0):
            given: dict[str, Any] = {name: np.array([end], dtype=np.float32)}
            assert getattr(parse(text_input="a", **given).params, name) == end
        given = {name: np.array([2.5], dtype=np.float32)}
        refused(rf"{name} must be in \[-2, 2\], got 2.5", text_input="a", **given)
    assert parse(text_input="a", repetition_penalty=np.array([2.0], dtype=np.float32)).params.repetition_penalty == 2.0
    refused(r"repetition_penalty must be in \(0, 2\], got 0.0", text_input="a",
            repetition_penalty=np.array([0.0], dtype=np.float32))


def test_settings_a_guide_cannot_honour_are_refused_by_name() -> None:
    guided: dict[str, Any] = dict(text_input="a", guided_decoding_guide_type="json")
    refused(r"ignore_eos cannot be combined with guided decoding: the grammar decides where the answer ends",
            ignore_eos=True, **guided)
    refused(r"min_tokens cannot be combined with guided decoding: the grammar decides where the answer ends",
            min_tokens=np.array([4], dtype=np.int32), **guided)
    refused(r"remask_threshold cannot be combined with guided decoding: a constrained block is committed left to "
            r"right and never re-masked", remask_threshold=np.array([0.3], dtype=np.float32), **guided)
    # their neutral values are not refused
    r = parse(ignore_eos=False, min_tokens=np.array([0], dtype=np.int32), **guided)
    assert (r.guide, r.params.ignore_eos, r.params.min_tokens, r.params.remask_threshold) == (("json", ""), False, 0,
                                                                                              None)
