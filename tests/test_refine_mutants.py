"""`dlm.refine` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded, or that
it would: each parameter's accepted extremes and its refusal word for word, the ids read from config.json, and when
an end token is allowed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from dlm.refine import GenerationParams, TokenSpec

EDGES: list[dict[str, Any]] = [
    {"max_tokens": 1}, {"block_length": 2}, {"threshold": 1.0}, {"threshold": 1e-9}, {"steps": 1},
    {"temperature": 0.0}, {"top_k": 1}, {"top_p": 1.0}, {"top_p": 1e-9}, {"logprobs": 0}, {"logprobs": 20},
    {"min_tokens": 0}, {"max_block_passes": 1}, {"remask_threshold": 1e-9}, {"remask_threshold": 1 - 1e-9},
    {"max_remasks": 0}, {"mode": "ar"}, {"mode": "speculative"},
]


@pytest.mark.parametrize("fields", EDGES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_each_parameter_accepts_its_extremes(fields: dict[str, Any]) -> None:
    GenerationParams(**fields).validate()


@pytest.mark.parametrize("fields, message", [
    ({"mode": "fast"}, "mode 'fast' is unknown: expected one of ar, diffusion, speculative"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"block_length": 1}, "block_length must be at least 2, got 1"),
    ({"threshold": 0.0}, "threshold must be in (0, 1], got 0.0"),
    ({"threshold": 1.5}, "threshold must be in (0, 1], got 1.5"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    ({"top_k": 0}, "top_k must be at least 1, got 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
    ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
    ({"min_tokens": -1}, "min_tokens must be at least 0, got -1"),
    ({"max_block_passes": 0}, "max_block_passes must be at least 1, got 0"),
    ({"remask_threshold": 0.0}, "remask_threshold must be in (0, 1), got 0.0"),
    ({"remask_threshold": 1.0}, "remask_threshold must be in (0, 1), got 1.0"),
    ({"max_remasks": -1}, "max_remasks must be at least 0, got -1"),
])
def test_each_refusal_names_the_field_its_range_and_the_value(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        GenerationParams(**fields).validate()
    assert str(raised.value) == message


def test_the_end_token_is_allowed_from_min_tokens_or_never_with_ignore_eos() -> None:
    assert GenerationParams(max_tokens=10).eos_allowed_from == 0
    assert GenerationParams(max_tokens=10, min_tokens=4).eos_allowed_from == 4
    assert GenerationParams(max_tokens=10, min_tokens=4, ignore_eos=True).eos_allowed_from == 11


def test_token_ids_from_config_json() -> None:
    config = {"mask_token_id": "100", "eos_token_id": 2, "block_size": "32", "max_position_embeddings": 4096}
    spec = TokenSpec.from_config(config)
    assert spec == TokenSpec(mask_token_id=100, eos_token_ids=frozenset({2}), block_size=32,
                             max_position_embeddings=4096)
    assert TokenSpec.from_config({**config, "eos_token_id": [2, "11"]}).eos_token_ids == frozenset({2, 11})
    # the checkpoint's end tokens, all of them (dlm.special_tokens), replace config.json's own
    assert TokenSpec.from_config(config, frozenset({2, 7})).eos_token_ids == frozenset({2, 7})
    assert dataclasses.replace(spec).block_size == 32
