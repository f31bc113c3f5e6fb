"""The `dlm` model in a real tritonserver (scripts/serve.sh): every protocol and mode gives the text the same graph
gives in-process; concurrency, cancellation, stop words, errors and metrics. Requests go through tritonclient
directly, so these tests hold the server to the contract whatever the project's client library does."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MINIATURE, ROOT
from export.tasks import held_out_set
from triton_server import (ENDLESS_PROMPT, ENDLESS_TOKENS, LOG_PROB_OUTPUTS, engine_top_k, grpc_generate,
                           given_up_until_cancelled, grpc_inputs, http_post, wait_until)

MODES = ["ar", "diffusion", "speculative"]
ENGINE = ROOT / "model_repository" / "dlm" / "1" / "engine"
LONG = held_out_set("upper", 4)[0].prompt  # an upper-casing prompt: a 37-token answer, several blocks
SHORT = "4821+377="


@pytest.fixture(scope="module")
def in_process():
    """The server's graph (the ONNX artifact in the repository) decoded in this process, one request at a time."""
    from dlm.refine import GenerationParams
    from export.inprocess import InProcessGenerator

    generator = InProcessGenerator(MINIATURE, artifact=ENGINE, runtime="onnxruntime")
    return lambda text, **kw: generator.generate([text], GenerationParams(**kw))[0].text


@pytest.mark.parametrize("mode", MODES)
def test_grpc_unary_and_streaming_give_the_in_process_text(triton, in_process, mode):
    expected = in_process(LONG, mode=mode, max_tokens=48)
    unary = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48)
    assert len(unary) == 1 and unary[0]["text"] == expected
    streamed = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, stream=True)
    assert "".join(r["text"] for r in streamed) == expected
    assert len(streamed) >= 2  # the first seed, then blocks as they commit
    forwards = [r["num_forwards"] for r in streamed]
    assert forwards == sorted(forwards) and forwards[-1] == unary[0]["num_forwards"]
    assert unary[0]["finish_reason"] == streamed[-1]["finish_reason"] == "stop"  # the end token
    assert [r["finish_reason"] for r in streamed[:-1]] == [None] * (len(streamed) - 1)
    short = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=5)
    assert len(short[0]["text"]) == 5 and short[0]["finish_reason"] == "length"


@pytest.mark.parametrize("mode", MODES)
def test_http_generate_and_generate_stream(triton, in_process, mode):
    expected = in_process(LONG, mode=mode, max_tokens=48)
    status, body = http_post(triton.http_url, "generate", {"text_input": LONG, "mode": mode, "max_tokens": 48})
    assert status == 200 and json.loads(body)["text_output"] == expected
    status, body = http_post(triton.http_url, "generate_stream",
                             {"text_input": LONG, "mode": mode, "max_tokens": 48, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and len(events) >= 2
    assert "".join(e["text_output"] for e in events) == expected


def test_concurrent_clients_with_mixed_modes_get_their_solo_texts(triton):
    prompts = [p.prompt for p in held_out_set("upper", 4) + held_out_set("addition", 4)]
    requests = [(prompt, MODES[i % 3]) for i, prompt in enumerate(prompts)]
    solo = [grpc_generate(triton.grpc_url, p, mode=m, max_tokens=40)[0]["text"] for p, m in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(
            lambda r: grpc_generate(triton.grpc_url, r[0], mode=r[1], max_tokens=40, stream=True), requests))
    assert ["".join(x["text"] for x in t) for t in together] == solo


def wait_for_metric(server, name: str, predicate, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = server.metrics().get(name, 0.0)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def settled(m: dict[str, float]) -> bool:
    """The metrics thread has caught up: every pass counted and observed, nothing running. It records a batch of
    events at a time, so a scrape can land in the middle of one (a step's latency observed, the passes counter not
    yet raised) or while an earlier test's pass is recorded."""
    return (m.get("dlm_engine_passes_total", 0) >= 3 and m.get("dlm_live_slots") == 0
            and m.get("dlm_queue_depth") == 0
            and m.get("dlm_step_latency_seconds_count") == m.get("dlm_engine_passes_total"))


def test_cancelled_stream_frees_its_slot_and_the_server_keeps_serving(triton):
    first = given_up_until_cancelled(
        triton, 'dlm_requests_total{mode="ar",outcome="cancelled"}',
        lambda: grpc_generate(triton.grpc_url, ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS, stream=True,
                              cancel_after=1))
    assert len(first) == 1  # we leave after the first of 200 responses
    assert wait_for_metric(triton, "dlm_live_slots", lambda v: v == 0) == 0
    assert grpc_generate(triton.grpc_url, SHORT, mode="ar")[0]["text"]


def test_stop_words_end_the_text_before_them(triton, in_process):
    full = in_process(LONG, mode="diffusion", max_tokens=48)
    stop = full[10:13]
    out = grpc_generate(triton.grpc_url, LONG, mode="diffusion", max_tokens=48, stop_words=[stop], stream=True)
    assert "".join(r["text"] for r in out) == full[: full.index(stop)]


INVALID = [
    ({"text": ""}, "input 'text_input' is empty"),
    ({"mode": "fast"}, "mode 'fast' is unknown: expected one of ar, diffusion, speculative"),
    ({"threshold": 0.0}, r"threshold must be in (0, 1], got 0.0"),
    ({"threshold": 1.5}, r"threshold must be in (0, 1], got 1.5"),
    ({"steps": 0}, "steps must be in [1, 32], got 0"),
    ({"steps": 33}, "steps must be in [1, 32], got 33"),
    ({"block_length": 1}, "block_length must be in [2, "),
    ({"block_length": 100000}, "block_length must be in [2, "),
    ({"max_tokens": 0}, "max_tokens must be in [1, "),
    ({"max_tokens": 5000}, "max_tokens must be in [1, 991]"),
    ({"text": "1" * 1200}, "input 'text_input': the prompt ("),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"top_k": 0}, "top_k must be in [1, 64], got 0"),
    ({"top_k": 65}, "top_k must be in [1, 64], got 65"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": float("nan")}, "top_p must be in (0, 1], got nan"),
    ({"top_logprobs": 21}, "top_logprobs must be in [0, 20], got 21"),
    ({"top_logprobs": -1}, "top_logprobs must be in [0, 20], got -1"),
    ({"min_tokens": -1}, "min_tokens must be in [0, 64] (at most max_tokens), got -1"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens must be in [0, 8] (at most max_tokens), got 9"),
    ({"min_length": 65}, "min_length must be in [0, 64] (at most max_tokens), got 65"),
    ({"min_length": 2, "min_tokens": 3}, "min_length (2) and min_tokens (3) must agree"),
    ({"remask_threshold": 0.0}, "remask_threshold must be in (0, 1), got 0.0"),
    ({"remask_threshold": 1.0}, "remask_threshold must be in (0, 1), got 1.0"),
    ({"remask_threshold": float("nan")}, "remask_threshold must be in (0, 1), got nan"),
    ({"max_remasks": -1}, "max_remasks must be in [0, 2147483647], got -1"),
    ({"sampling_parameters": "{max_tokens: 8}"}, "input 'sampling_parameters' is not valid JSON"),
    ({"sampling_parameters": '"8"'}, "input 'sampling_parameters' must be a JSON object, got str"),
    ({"sampling_parameters": '{"n": 2}'}, "sampling_parameters key 'n' is unknown: expected some of temperature"),
    ({"sampling_parameters": '{"max_tokens": "many"}'}, "sampling_parameters 'max_tokens' must be an integer"),
    ({"sampling_parameters": '{"min_tokens": 65}'}, "min_tokens must be in [0, 64] (at most max_tokens), got 65"),
    ({"sampling_parameters": '{"max_tokens": 4}', "max_tokens": 8},
     "sampling_parameters 'max_tokens' (4) and input 'max_tokens' (8) must agree"),
]


@pytest.mark.parametrize("values, message", INVALID, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_input_gets_an_error_naming_it_and_the_next_request_succeeds(triton, values, message):
    values = dict(values)
    text = values.pop("text", SHORT)
    with pytest.raises(Exception) as error:
        grpc_generate(triton.grpc_url, text, **values)
    assert message in str(error.value)
    assert grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=8)[0]["text"]


def test_wrong_dtype_shape_and_missing_input_are_refused(triton):
    wrong_dtype = grpc_inputs(SHORT)
    tensor = grpcclient.InferInput("max_tokens", [1], "INT64")
    tensor.set_data_from_numpy(np.array([8], dtype=np.int64))
    wrong_dtype.append(tensor)
    wrong_shape = grpcclient.InferInput("text_input", [2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    missing = grpc_inputs(SHORT, max_tokens=8)[1:]
    for inputs, message in [(wrong_dtype, "max_tokens"), ([wrong_shape], "text_input"), (missing, "text_input")]:
        with pytest.raises(Exception) as error:
            grpc_generate(triton.grpc_url, SHORT, inputs=inputs)
        assert message in str(error.value)
    status, body = http_post(triton.http_url, "generate", {"text_input": SHORT, "threshold": 2.0})
    assert status == 400 and "threshold must be in (0, 1], got 2.0" in json.loads(body)["error"]
    assert grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=8)[0]["text"]


def test_metrics_count_requests_tokens_passes_and_latency(triton):
    grpc_generate(triton.grpc_url, LONG, mode="diffusion", max_tokens=40)
    m = wait_until(triton, settled)
    passes = m["dlm_engine_passes_total"]
    assert m['dlm_requests_total{mode="diffusion",outcome="eos"}'] >= 1
    assert m['dlm_generated_tokens_total{mode="diffusion"}'] >= 37
    assert passes >= 3
    assert m['dlm_tokens_per_forward_count{mode="diffusion"}'] >= 1
    assert m["dlm_step_latency_seconds_count"] == m["dlm_engine_passes_total"]
    assert m["dlm_live_slots"] == 0 and m["dlm_queue_depth"] == 0


# --- sampling controls and log probs ------------------------------------------------------------------------------
def test_the_engine_k_is_the_one_the_bounds_name():
    assert engine_top_k() == 64  # the bounds in INVALID above


def log_prob_tokens(responses: list[dict]) -> list[bytes]:
    return [t for r in responses for t in r["output_tokens"].tolist()]


@pytest.mark.parametrize("mode", MODES)
def test_log_probs_cover_the_delivered_text_unary_and_streamed(triton, mode):
    unary = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, top_logprobs=3)
    (response,) = unary
    text, tokens = response["text"], response["output_tokens"]
    log_probs, top, top_tokens = (response[k] for k in ("output_log_probs", "output_top_log_probs",
                                                        "output_top_tokens"))
    assert b"".join(tokens.tolist()).decode() == text  # the end token is left out, as text_output leaves it out
    assert len(tokens) == response["num_tokens"] - 1 and log_probs.dtype == np.float32
    assert top.shape == top_tokens.shape == (len(tokens), 3)
    assert np.all(log_probs <= 0) and np.all(np.diff(top, axis=1) <= 0)  # alternatives best first
    # at temperature 0 the chosen token is the best candidate
    assert top_tokens[:, 0].tolist() == tokens.tolist() and np.allclose(top[:, 0], log_probs)
    streamed = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, stream=True, top_logprobs=3)
    assert len(streamed) >= 2
    for r in streamed:  # each response carries the tokens of its own text
        assert b"".join(r["output_tokens"].tolist()).decode() == r["text"]
        assert r["output_top_log_probs"].shape == (len(r["output_tokens"]), 3)
    assert log_prob_tokens(streamed) == tokens.tolist()
    assert np.allclose(np.concatenate([r["output_log_probs"] for r in streamed]), log_probs, atol=1e-5)


def test_log_probs_only_when_asked_and_alternatives_only_when_asked(triton):
    plain = grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=8)[0]
    assert not set(LOG_PROB_OUTPUTS) & set(plain)
    only = grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=8, return_log_probs=True)[0]
    assert set(LOG_PROB_OUTPUTS) & set(only) == {"output_log_probs", "output_tokens"}
    off = grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=8, return_log_probs=False)[0]
    assert off.keys() == plain.keys()
    status, body = http_post(triton.http_url, "generate", {"text_input": SHORT, "mode": "ar", "max_tokens": 8,
                                                           "top_logprobs": 2})
    answer = json.loads(body)
    assert status == 200 and len(answer["output_top_log_probs"]) == 2 * len(answer["output_tokens"])


def test_log_probs_stop_with_the_text_at_a_stop_word(triton):
    full = grpc_generate(triton.grpc_url, LONG, mode="diffusion", max_tokens=48)[0]["text"]
    stop = full[10:13]
    for stream in (False, True):
        out = grpc_generate(triton.grpc_url, LONG, mode="diffusion", max_tokens=48, stop_words=[stop], stream=stream,
                            return_log_probs=True)
        assert b"".join(log_prob_tokens(out)).decode() == "".join(r["text"] for r in out) == full[: full.index(stop)]


def test_no_seed_draws_a_fresh_one_and_a_seed_reproduces(triton):
    sample: dict[str, Any] = {"mode": "ar", "max_tokens": 16, "temperature": 1.5}
    unseeded = {grpc_generate(triton.grpc_url, ENDLESS_PROMPT, **sample)[0]["text"] for _ in range(3)}
    assert len(unseeded) > 1  # 16 draws at temperature 1.5 from a spread-out distribution
    for mode in MODES:
        seeded = [grpc_generate(triton.grpc_url, ENDLESS_PROMPT, **{**sample, "mode": mode}, seed=11)[0]["text"]
                  for _ in range(2)]
        assert seeded[0] == seeded[1]


def test_top_k_and_top_p_cut_the_candidates_sampled(triton):
    greedy = grpc_generate(triton.grpc_url, ENDLESS_PROMPT, mode="ar", max_tokens=16)[0]["text"]
    hot: dict[str, Any] = {"mode": "ar", "max_tokens": 16, "temperature": 1.5}
    assert grpc_generate(triton.grpc_url, ENDLESS_PROMPT, **hot, top_k=1)[0]["text"] == greedy
    assert grpc_generate(triton.grpc_url, ENDLESS_PROMPT, **hot, top_p=1e-6)[0]["text"] == greedy
    for seed in range(3):
        r = grpc_generate(triton.grpc_url, ENDLESS_PROMPT, **hot, top_k=2, seed=seed, top_logprobs=2)[0]
        best_two = r["output_top_tokens"].tolist()
        assert all(t in pair for t, pair in zip(r["output_tokens"].tolist(), best_two))


# --- the inputs NVIDIA's benchmarking clients send (issue 15), re-masking and the pass cap (issue 12) -------------
@pytest.mark.parametrize("mode", MODES)
def test_min_tokens_and_ignore_eos_hold_in_every_mode(triton, mode):
    plain = grpc_generate(triton.grpc_url, SHORT, mode=mode, max_tokens=24)[0]
    assert plain["finish_reason"] == "stop" and plain["num_tokens"] < 10  # the miniature's answer ends early
    for name in ("min_tokens", "min_length"):
        minimum: dict[str, Any] = {name: 10}
        held = grpc_generate(triton.grpc_url, SHORT, mode=mode, max_tokens=24, **minimum)[0]
        # no end token among the first 10: one after them (counted), or none up to max_tokens
        assert held["num_tokens"] > 10 and len(held["text"]) >= 10, held
        assert held["text"].startswith(plain["text"]) or mode == "diffusion", held
    for stream in (False, True):
        out = grpc_generate(triton.grpc_url, SHORT, mode=mode, max_tokens=24, ignore_eos=True, stream=stream)
        assert out[-1]["num_tokens"] == 24 and out[-1]["finish_reason"] == "length"
        assert len("".join(r["text"] for r in out)) == 24  # a character tokenizer: every token is text


def test_speculative_with_min_tokens_equals_ar(triton):
    for values in ({"min_tokens": 12}, {"ignore_eos": True}, {"min_length": 30}):
        ar = grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=40, **values)[0]
        speculative = grpc_generate(triton.grpc_url, SHORT, mode="speculative", max_tokens=40, **values)[0]
        assert speculative["text"] == ar["text"] and speculative["num_tokens"] == ar["num_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_exclude_input_in_output_false_puts_the_prompt_first(triton, mode):
    answer = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48)[0]
    assert grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, exclude_input_in_output=True)[0] == answer
    unary = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, exclude_input_in_output=False)[0]
    assert unary["text"] == LONG + answer["text"] and unary["num_tokens"] == answer["num_tokens"]
    streamed = grpc_generate(triton.grpc_url, LONG, mode=mode, max_tokens=48, stream=True,
                             exclude_input_in_output=False)
    assert streamed[0]["text"].startswith(LONG) and len(streamed) >= 2
    assert "".join(r["text"] for r in streamed) == LONG + answer["text"]
    status, body = http_post(triton.http_url, "generate", {"text_input": LONG, "mode": mode, "max_tokens": 48,
                                                           "exclude_input_in_output": False})
    assert status == 200 and json.loads(body)["text_output"] == LONG + answer["text"]


def test_sampling_parameters_as_vllm_and_genai_perf_send_them(triton):
    # genai-perf --backend vllm --osl 16: numbers as strings
    settings = json.dumps({"max_tokens": "16", "min_tokens": "16"})
    out = grpc_generate(triton.grpc_url, SHORT, sampling_parameters=settings, exclude_input_in_output=True,
                        stream=True)
    assert out[-1]["num_tokens"] == 16 and out[-1]["finish_reason"] == "length"
    settings = json.dumps({"mode": "ar", "max_tokens": 24, "temperature": 0, "stop": ["8"]})
    expected = grpc_generate(triton.grpc_url, SHORT, mode="ar", max_tokens=24, stop_words=["8"])[0]["text"]
    assert grpc_generate(triton.grpc_url, SHORT, sampling_parameters=settings)[0]["text"] == expected
    # given both ways: the same value is accepted
    assert grpc_generate(triton.grpc_url, SHORT, sampling_parameters=settings, mode="ar")[0]["text"] == expected
    status, body = http_post(triton.http_url, "generate_stream", {
        "text_input": SHORT, "stream": True, "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"max_tokens": 20, "ignore_eos": True, "temperature": 0.0})})
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1]["num_tokens"] == 20 and events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("block_length", [8, 32])
def test_threshold_with_steps_caps_the_passes_of_each_block(triton, block_length):
    request: dict[str, Any] = {"mode": "diffusion", "max_tokens": 64, "ignore_eos": True,
                               "block_length": block_length}
    blocks = -(-64 // block_length)
    uncapped = grpc_generate(triton.grpc_url, SHORT, threshold=0.999, **request)[0]["num_forwards"]
    for steps in (1, 2, 4):
        capped = grpc_generate(triton.grpc_url, SHORT, threshold=0.999, steps=steps, **request)[0]
        # the prefill, then per block at most `steps` denoising passes and the pass that writes it
        assert capped["num_tokens"] == 64 and capped["num_forwards"] <= 1 + blocks * (steps + 1), capped
        assert capped["num_forwards"] < uncapped
    # steps alone is fixed steps per block, as before
    fixed = grpc_generate(triton.grpc_url, SHORT, steps=2, **request)[0]
    assert fixed["num_forwards"] <= 1 + blocks * 3


def test_remasking_is_accepted_and_a_zero_budget_is_plain_threshold_decoding(triton):
    request: dict[str, Any] = {"mode": "diffusion", "max_tokens": 64, "ignore_eos": True, "threshold": 0.9}
    plain = grpc_generate(triton.grpc_url, SHORT, **request)[0]
    assert grpc_generate(triton.grpc_url, SHORT, **request, remask_threshold=0.9, max_remasks=0)[0] == plain
    remasked = grpc_generate(triton.grpc_url, SHORT, **request, remask_threshold=0.9)[0]
    assert remasked["num_tokens"] == 64 and remasked != plain  # re-masking changed what this block committed
    bounded = grpc_generate(triton.grpc_url, SHORT, **request, remask_threshold=0.9, max_remasks=1, stream=True)
    assert bounded[-1]["num_tokens"] == 64


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), prompt=st.sampled_from([SHORT, "57+8=", "upper:abc=", "9+", LONG]),
       max_tokens=st.integers(1, 40), fraction=st.floats(0, 1), ignore_eos=st.booleans(), stream=st.booleans(),
       block_length=st.sampled_from([None, 4, 16]), temperature=st.sampled_from([0.0, 1.0]))
def test_property_no_end_token_before_min_tokens_and_max_tokens_with_ignore_eos(
        triton, mode, prompt, max_tokens, fraction, ignore_eos, stream, block_length, temperature):
    min_tokens = int(fraction * max_tokens)
    values: dict[str, Any] = {"mode": mode, "max_tokens": max_tokens, "min_tokens": min_tokens, "stream": stream,
                              "temperature": temperature, "seed": 5}
    if ignore_eos:
        values["ignore_eos"] = True
    if block_length:
        values["block_length"] = block_length
    last = grpc_generate(triton.grpc_url, prompt, **values)[-1]
    if ignore_eos:
        assert last["num_tokens"] == max_tokens and last["finish_reason"] == "length", last
    else:  # an end token (counted in num_tokens) only after min_tokens tokens, or none at all
        assert last["num_tokens"] > min_tokens or last["num_tokens"] == max_tokens, last
