"""Penalties on the engine's candidates (`dlm.penalties`): the arithmetic as vLLM applies it, `ar` against a
reference over the full logits' top K, speculative equal to `ar` under the same penalties at temperature 0, every
mode changed where the penalties should change it, and out-of-range values refused with the name and the range
(the model's inputs, vLLM's sampling_parameters, the gateway's fields)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from dlm import penalties
from dlm.contract import DEFAULT_TOP_K
from dlm.inputs import Defaults, InvalidInput, Limits, parse_request
from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 40, 41]]
PENALTIES = [
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(repetition_penalty=1.8),
    dict(frequency_penalty=0.7, presence_penalty=-0.5, repetition_penalty=1.3),
]
PIDS = ["frequency", "presence", "repetition", "all"]


@pytest.fixture
def runtime(tiny_model, tiny_config_dict):
    return TorchRuntime(tiny_model, CacheLayout.from_config(tiny_config_dict))


@pytest.fixture
def spec(tiny_config_dict):
    return dataclasses.replace(TokenSpec.from_config(tiny_config_dict), eos_token_ids=frozenset())  # never ends


def test_the_arithmetic_is_vllms():
    logits = np.array([[4.0, 2.0, -1.0, -3.0]], dtype=np.float32)
    candidates = np.array([[10, 11, 12, 13]])
    # 10 twice in the answer, 12 once; 13 in the prompt only
    history = penalties.History(np.array([10, 12, 10]), np.array([3]), np.array([13]))
    out = penalties.apply(logits, candidates, history, 0.5, 0.25, 2.0)
    # 10: 4 / 2 - 0.5 * 2 - 0.25; 11: untouched; 12: -1 * 2 - 0.5 - 0.25; 13 (prompt): -3 * 2, no answer count
    np.testing.assert_allclose(out, [[2.0 - 1.0 - 0.25, 2.0, -2.0 - 0.75, -6.0]])
    # a causal prediction sees only the answer before it: position 0 sees nothing, position 1 the first token
    history = penalties.History(np.array([10, 12, 10]), np.array([0, 1]), np.array([], dtype=np.int64))
    out = penalties.apply(np.repeat(logits, 2, axis=0), np.repeat(candidates, 2, axis=0), history, 1.0, 0.0, 1.0)
    np.testing.assert_allclose(out, [[4.0, 2.0, -1.0, -3.0], [3.0, 2.0, -1.0, -3.0]])


def reference_ar(model, prompt: list[int], n: int, mask_id: int, frequency: float = 0.0, presence: float = 0.0,
                 repetition: float = 1.0) -> list[int]:
    """Greedy decoding from the full logits (no cache): vLLM's penalties on the K best tokens, then the best."""
    import torch

    answer: list[int] = []
    for _ in range(n):
        ids = torch.tensor([prompt + answer])
        t = ids.shape[1]
        with torch.no_grad():
            full, _ = model.full_logits(ids, torch.arange(t)[None], torch.ones(1, t, dtype=torch.long),
                                        model.empty_cache(1), torch.tensor(True))
        last = full[0, -1].float()
        last[mask_id] = float("-inf")
        top = torch.topk(last, DEFAULT_TOP_K)
        scores = top.values.clone()
        for j, token in enumerate(top.indices.tolist()):
            count = answer.count(token)
            if repetition != 1.0 and (count or token in prompt):
                scores[j] = scores[j] / repetition if scores[j] > 0 else scores[j] * repetition
            scores[j] -= frequency * count + presence * (count > 0)
        answer.append(int(top.indices[int(torch.argmax(scores))]))
    return answer


@pytest.mark.parametrize("setting", PENALTIES, ids=PIDS)
def test_ar_with_penalties_equals_a_full_logits_reference(runtime, spec, tiny_model, setting):
    params = GenerationParams("ar", 12, **setting)
    got = generate(runtime, PROMPTS[:1], params, spec)[0].tokens
    want = reference_ar(tiny_model, PROMPTS[0], 12, spec.mask_token_id, setting.get("frequency_penalty", 0.0),
                        setting.get("presence_penalty", 0.0), setting.get("repetition_penalty", 1.0))
    assert got == want
    assert got != generate(runtime, PROMPTS[:1], GenerationParams("ar", 12), spec)[0].tokens  # they changed it


@pytest.mark.parametrize("setting", PENALTIES, ids=PIDS)
def test_speculative_with_penalties_equals_ar_at_temperature_zero(runtime, spec, setting):
    ar = generate(runtime, PROMPTS, GenerationParams("ar", 20, **setting), spec)
    sp = generate(runtime, PROMPTS, GenerationParams("speculative", 20, **setting), spec)
    assert [r.tokens for r in ar] == [r.tokens for r in sp]


@pytest.mark.parametrize("params", [GenerationParams("diffusion", 24, threshold=0.9),
                                    GenerationParams("diffusion", 24, threshold=None, steps=4),
                                    GenerationParams("speculative", 24), GenerationParams("ar", 24)],
                         ids=["diffusion-threshold", "diffusion-steps", "speculative", "ar"])
def test_a_strong_presence_penalty_spreads_the_answer_in_every_mode(runtime, spec, params):
    """The random tiny model repeats itself; at the largest presence penalty each mode repeats less."""
    plain = generate(runtime, PROMPTS, params, spec)
    spread = generate(runtime, PROMPTS, dataclasses.replace(params, presence_penalty=2.0,
                                                            frequency_penalty=2.0), spec)
    distinct = lambda rows: sum(len(set(r.tokens)) for r in rows)  # noqa: E731
    assert distinct(spread) > distinct(plain)
    # log probs stay the model's: the penalties decide the choice, not the reported probabilities
    scored = generate(runtime, PROMPTS[:1], dataclasses.replace(params, presence_penalty=2.0, logprobs=0), spec)
    assert all(lp <= 0.0 for lp in scored[0].logprobs)


def test_penalties_with_sampling_are_reproducible(runtime, spec):
    params = GenerationParams("diffusion", 16, temperature=0.8, seed=7, repetition_penalty=1.5)
    assert [r.tokens for r in generate(runtime, PROMPTS, params, spec)] == \
        [r.tokens for r in generate(runtime, PROMPTS, params, spec)]


@pytest.mark.parametrize("field, value, message", [
    ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2]"),
    ("presence_penalty", -2.01, "presence_penalty must be in [-2, 2]"),
    ("presence_penalty", float("nan"), "presence_penalty must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in (0, 2]"),
    ("repetition_penalty", 2.5, "repetition_penalty must be in (0, 2]"),
])
def test_out_of_range_penalties_name_the_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        GenerationParams(**{field: value}).validate()
    inputs = {"text_input": np.array([b"12+34="], dtype=object), field: np.array([value], dtype=np.float32)}
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_request(inputs.get, Defaults(), Limits(context=256, max_block_length=32), 8)
    json_inputs = {"text_input": inputs["text_input"],
                   "sampling_parameters": np.array([f'{{"{field}": {value if value == value else 9}}}'.encode()],
                                                   dtype=object)}
    if value == value:  # JSON has no NaN
        with pytest.raises(InvalidInput, match=field):
            parse_request(json_inputs.get, Defaults(), Limits(context=256, max_block_length=32), 8)


def test_penalties_reach_the_parameters_as_inputs_and_as_sampling_parameters():
    limits = Limits(context=256, max_block_length=32)
    inputs = {"text_input": np.array([b"12+34="], dtype=object),
              "frequency_penalty": np.array([0.5], dtype=np.float32),
              "sampling_parameters": np.array([b'{"presence_penalty": -1, "repetition_penalty": "1.2",'
                                               b' "frequency_penalty": 0.5}'], dtype=object)}
    params = parse_request(inputs.get, Defaults(), limits, 8).params
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -1.0)
    assert params.repetition_penalty == pytest.approx(1.2)
    inputs["frequency_penalty"] = np.array([0.25], dtype=np.float32)
    with pytest.raises(InvalidInput, match="frequency_penalty.*must agree"):
        parse_request(inputs.get, Defaults(), limits, 8)
    plain = parse_request({"text_input": inputs["text_input"]}.get, Defaults(), limits, 8).params
    assert not plain.penalised


def test_the_gateway_maps_the_penalties_and_refuses_them_out_of_range():
    from client.gateway import NOT_HONOURED, ChatRequest, CompletionRequest

    assert not {"frequency_penalty", "presence_penalty"} & set(NOT_HONOURED)
    request = CompletionRequest(model="dlm", prompt="x", frequency_penalty=0.5, presence_penalty=-1.0,
                                repetition_penalty=1.1)
    assert request.unsupported() is None
    options = request.options()
    assert (options["frequency_penalty"], options["presence_penalty"], options["repetition_penalty"]) == \
        (0.5, -1.0, 1.1)
    assert not {"frequency_penalty", "presence_penalty", "repetition_penalty"} & set(
        CompletionRequest(model="dlm", prompt="x", frequency_penalty=0, repetition_penalty=1.0).options())
    messages: Any = [{"role": "user", "content": "x"}]
    cases: list[tuple[str, Any, str]] = [("frequency_penalty", 2.5, "[-2, 2]"), ("presence_penalty", -3, "[-2, 2]"),
                                         ("repetition_penalty", 0.0, "(0, 2]")]
    for field, value, words in cases:
        name, message = ChatRequest(model="dlm", messages=messages, **{field: value}).unsupported() or ("", "")
        assert name == field and words in message
