"""Property-based bad input against the real server (hypothesis): whatever a client sends over gRPC, HTTP or the
OpenAI-compatible gateway, it gets a clear error or a valid answer within a time limit, never a hang or a crash,
and a valid request right after it succeeds. The number of cases tried is printed and written to the session's temporary folder."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_server import engine_top_k, grpc_generate, http_post

EXAMPLES = 100  # per protocol: a fixed budget, so the suite's time stays bounded
CASES = {"grpc": 0, "http": 0, "gateway": 0, "answered": 0, "refused": 0}
SPEC = {  # the contract's dtypes (DESIGN §5)
    "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "seed": "UINT64",
    "stop_words": "BYTES", "mode": "BYTES", "block_length": "INT32", "threshold": "FP32", "steps": "INT32",
    "top_k": "INT32", "top_p": "FP32", "return_log_probs": "BOOL", "top_logprobs": "INT32",
    "remask_threshold": "FP32", "max_remasks": "INT32", "min_tokens": "INT32", "min_length": "INT32",
    "ignore_eos": "BOOL", "exclude_input_in_output": "BOOL", "sampling_parameters": "BYTES", "draft_adapter": "BOOL",
}
NUMPY: dict[str, Any] = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "FP32": np.float32,
         "FP64": np.float64, "UINT64": np.uint64}

def mostly(valid, invalid):
    """`valid` three times in four: enough valid requests get through to be decoded."""
    return st.one_of(valid, valid, valid, invalid)


texts = mostly(
    st.sampled_from(["4821+377=", "57+8=", "upper:abcdefghijklmnopqrstuvwxyz0123456789="]),
    st.one_of(st.text(max_size=40), st.binary(max_size=40), st.just(""),
              st.integers(1000, 200_000).map(lambda n: "7" * n)),  # beyond the context, or far beyond
)
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 2, 32, 33, 991, 992, 5000]))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
# vLLM's sampling_parameters: known keys with plausible values (numbers sometimes as strings, as genai-perf writes
# them), or any JSON document with any keys
SAMPLING = {
    "max_tokens": st.integers(1, 24), "min_tokens": st.integers(0, 8), "temperature": st.sampled_from([0, 0.5]),
    "top_p": st.floats(0.1, 1.0), "top_k": st.integers(-1, 64), "seed": st.integers(0, 2**64 - 1),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)), "ignore_eos": st.booleans(),
    "mode": st.sampled_from(["ar", "diffusion", "speculative"]), "threshold": st.floats(0.05, 1.0),
    "steps": st.integers(1, 32), "block_length": st.integers(2, 64), "remask_threshold": st.floats(0.05, 0.95),
    "max_remasks": st.integers(0, 8), "draft_adapter": st.booleans(),
}
sampling_json = st.fixed_dictionaries({}, optional={
    key: st.one_of(strategy, strategy.map(str)) if key in ("max_tokens", "min_tokens", "temperature") else strategy
    for key, strategy in SAMPLING.items()}).map(json.dumps)
json_documents = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)),
    max_leaves=6).map(json.dumps)
values = {
    "text_input": texts,
    "max_tokens": mostly(st.integers(1, 24), int32),
    "stream": st.booleans(),
    "temperature": mostly(st.sampled_from([0.0, 0.7, 1.5]), floats),
    "seed": st.integers(0, 2**64 - 1),
    "stop_words": mostly(st.lists(st.text(max_size=3), max_size=3),
                         st.lists(st.one_of(st.text(max_size=4), st.binary(max_size=300)), max_size=20)),
    "mode": mostly(st.sampled_from(["ar", "diffusion", "speculative"]), st.one_of(st.text(max_size=12), st.binary(max_size=12))),
    "block_length": mostly(st.integers(2, 64), int32),
    "threshold": mostly(st.floats(0.05, 1.0), floats),
    "steps": mostly(st.integers(1, 32), int32),
    # out of range far more often in the dedicated property below: here mostly valid, so requests still get decoded
    "top_k": st.one_of(*[st.integers(1, 64)] * 7, int32),
    "top_p": st.one_of(*[st.floats(0.05, 1.0)] * 7, floats),
    "return_log_probs": st.booleans(),
    "top_logprobs": st.one_of(*[st.integers(0, 20)] * 7, int32),
    "remask_threshold": mostly(st.floats(0.05, 0.95), floats),
    "max_remasks": mostly(st.integers(0, 8), int32),
    "min_tokens": mostly(st.integers(0, 8), int32),
    "min_length": mostly(st.integers(0, 8), int32),
    "ignore_eos": st.booleans(),
    "exclude_input_in_output": st.booleans(),
    "draft_adapter": st.booleans(),
    "sampling_parameters": mostly(sampling_json, st.one_of(st.text(max_size=30), st.binary(max_size=30),
                                                           json_documents)),
}


@st.composite
def requests(draw):
    """A request: each input present or not, some with a wrong dtype or shape."""
    present = {name: name == "text_input" and draw(st.integers(0, 19)) > 0 or draw(st.integers(0, 2)) == 0
               for name in values}
    chosen = {name: draw(strategy) for name, strategy in values.items() if present[name]}
    tensors = {}
    for name, value in chosen.items():
        dtype = SPEC[name]
        if draw(st.integers(0, 19)) == 0:  # a wrong dtype
            dtype = draw(st.sampled_from(sorted(set(NUMPY) - {dtype})))
        array = np.array(value if name == "stop_words" else [value], dtype=np.object_)
        if name == "stop_words" and not len(array):
            array = np.array([b""], dtype=np.object_)
        if draw(st.integers(0, 19)) == 0:  # a wrong shape
            array = np.repeat(array, 2)
        tensors[name] = (dtype, array)
    return tensors


def as_dtype(dtype: str, array: np.ndarray) -> np.ndarray:
    if dtype == "BYTES":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in array], dtype=np.object_)
    with np.errstate(all="ignore"):
        converted = []
        for v in array:
            if isinstance(v, (bytes, str)):
                v = len(v)
            if np.issubdtype(NUMPY[dtype], np.integer):
                info = np.iinfo(NUMPY[dtype])
                v = int(min(max(v if math.isfinite(float(v)) else 0, info.min), info.max))
            converted.append(v)
        return np.array(converted, dtype=NUMPY[dtype])


def as_grpc(tensors) -> list:
    inputs = []
    for name, (dtype, array) in tensors.items():
        array = as_dtype(dtype, array)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def as_json(tensors) -> dict:
    body = {}
    for name, (dtype, array) in tensors.items():
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.tolist()]
        if dtype != SPEC[name]:  # a wrong JSON type in place of a wrong dtype
            items = [str(v) if not isinstance(v, str) else len(v) for v in items]
        body[name] = items if len(items) != 1 or name == "stop_words" else items[0]
    return body


def settle(answer: str | None, error: str | None) -> None:
    """A case ends with an answer or an error that says something; count it."""
    if error is None:
        assert answer is not None
        CASES["answered"] += 1
    else:
        assert error.strip() and not re.fullmatch(r"\s*(None|)\s*", error), "an empty error message"
        CASES["refused"] += 1


def still_serving(triton) -> None:
    assert grpc_generate(triton.grpc_url, "57+8=", mode="ar", max_tokens=4, timeout=60)[0]["text"] is not None


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_grpc_any_input_gets_an_answer_or_a_clear_error(triton, request):
    CASES["grpc"] += 1
    try:
        responses = grpc_generate(triton.grpc_url, "", inputs=as_grpc(request), timeout=60)
        settle("".join(r["text"] for r in responses), None)
    except (TimeoutError, __import__("queue").Empty) as e:
        pytest.fail(f"no answer within 60 s: {e!r}")
    except Exception as e:  # noqa: BLE001 - the server's error, carried by tritonclient
        settle(None, str(e))
    still_serving(triton)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(request=requests(), endpoint=st.sampled_from(["generate", "generate_stream"]))
def test_http_any_input_gets_an_answer_or_a_clear_error(triton, request, endpoint):
    CASES["http"] += 1
    status, body = http_post(triton.http_url, endpoint, as_json(request))
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    documents = events if endpoint == "generate_stream" and events else [json.loads(body)]
    errors = [d["error"] for d in documents if "error" in d]
    if status == 200 and not errors:
        settle(body, None)
    else:
        # the model's own refusals are 400; Triton's JSON-to-tensor parser answers a wrong JSON type with 500;
        # /generate answers a streamed request (several responses) with 200 and Triton's error saying so
        assert errors, (status, body)
        assert 400 <= status < 500 or (status == 500 and errors[0].startswith("Unable to parse")) or (
            status == 200 and endpoint == "generate_stream") or (  # an error event in the stream
            status == 200 and errors[0].startswith("generate expects model to produce exactly 1 response")), (
            status, body)
        settle(None, errors[0])
    still_serving(triton)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False),
                        st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
openai_fields = {
    "model": mostly(st.just("dlm"), json_values),
    "prompt": mostly(st.sampled_from(["4821+377=", "57+8=", "upper:abcdefghij="]), json_values),
    "max_tokens": mostly(st.integers(1, 16), json_values),
    "temperature": mostly(st.sampled_from([0.0, 0.5]), json_values),
    "stream": mostly(st.booleans(), json_values),
    "mode": mostly(st.sampled_from(["ar", "diffusion", "speculative"]), json_values),
    "threshold": mostly(st.floats(0.05, 1.0), json_values),
    "steps": mostly(st.integers(1, 32), json_values),
    "block_length": mostly(st.integers(2, 64), json_values),
    "top_k": mostly(st.integers(-1, 64), json_values),
    "top_p": mostly(st.floats(0.05, 1.0), json_values),
    "logprobs": mostly(st.one_of(st.integers(0, 20), st.booleans()), json_values),
    "top_logprobs": mostly(st.integers(0, 20), json_values),
    "stop": mostly(st.lists(st.text(max_size=3), max_size=2), json_values),
    "messages": mostly(st.just([{"role": "user", "content": "57+8="}]), json_values),
    "min_tokens": mostly(st.integers(0, 8), json_values),
    "ignore_eos": mostly(st.booleans(), json_values),
    "remask_threshold": mostly(st.floats(0.05, 0.95), json_values),
    "max_remasks": mostly(st.integers(0, 8), json_values),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                 "continuous_usage_stats": st.booleans()}),
                             json_values),
}


@st.composite
def openai_bodies(draw):
    body = {name: draw(strategy) for name, strategy in openai_fields.items() if draw(st.integers(0, 2)) > 0}
    if draw(st.integers(0, 9)) == 0:  # not JSON at all, or JSON that is not an object
        return draw(st.one_of(st.binary(max_size=30), json_values.map(lambda v: json.dumps(v).encode())))
    return json.dumps(body).encode()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(body=openai_bodies(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_gateway_any_body_gets_an_answer_or_an_openai_error(gateway_process, body, path):
    import httpx

    CASES["gateway"] += 1
    response = httpx.post(gateway_process.url + path, content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    if response.status_code == 200:
        settle(response.text, None)
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)  # the client's fault
        error = response.json()["error"]
        assert error["type"] and isinstance(error["message"], str)
        settle(None, error["message"])
    valid = httpx.post(gateway_process.url + "/v1/completions", json={"model": "dlm", "prompt": "57+8=", "max_tokens": 4},
                       timeout=60)
    assert valid.status_code == 200, valid.text


# --- out-of-range sampling controls and log probs: refused by name and range -------------------------------------
K = engine_top_k()
out_of_range = st.one_of(
    st.tuples(st.just("top_k"), st.one_of(st.integers(-(2**31), 0), st.integers(K + 1, 2**31 - 1))),
    st.tuples(st.just("top_p"), st.one_of(st.floats(max_value=0.0, width=32), st.floats(min_value=1.0, width=32,
                                                                                        exclude_min=True),
                                           st.just(math.nan))),
    st.tuples(st.just("top_logprobs"), st.one_of(st.integers(-(2**31), -1), st.integers(min(20, K) + 1, 2**31 - 1))),
)
RANGES = {"top_k": rf"\[1, {K}\]", "top_p": r"\(0, 1\]", "top_logprobs": rf"\[0, {min(20, K)}\]"}


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=out_of_range, stream=st.booleans(), mode=st.sampled_from(["ar", "diffusion", "speculative"]))
def test_out_of_range_sampling_and_log_probs_are_refused_by_name_and_range(triton, bad, stream, mode):
    CASES["grpc"] += 1
    name, value = bad
    with pytest.raises(Exception) as raised:
        grpc_generate(triton.grpc_url, "57+8=", mode=mode, stream=stream, max_tokens=4, **{name: value})
    assert re.search(rf"^{name} must be in {RANGES[name]}, got ", str(raised.value).split("] ", 1)[-1]), raised.value
    CASES["refused"] += 1
    still_serving(triton)


gateway_out_of_range = st.one_of(
    st.tuples(st.just("logprobs"), st.integers(21, 2**62)).map(lambda f: ("/v1/completions", *f)),
    st.tuples(st.just("top_logprobs"), st.integers(21, 2**62)).map(lambda f: ("/v1/chat/completions", *f)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.just("top_k"),
              st.integers(K + 1, 2**31 - 1)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.just("top_p"),
              st.one_of(st.floats(max_value=0.0, allow_infinity=False), st.floats(min_value=1.0, exclude_min=True,
                                                                                  allow_infinity=False))),
)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=gateway_out_of_range, stream=st.booleans())
def test_gateway_refuses_out_of_range_sampling_and_logprobs_with_400(gateway_process, bad, stream):
    import httpx

    CASES["gateway"] += 1
    path, name, value = bad
    body: dict[str, Any] = {"model": "dlm", "max_tokens": 4, "stream": stream, name: value}
    body.update({"prompt": "57+8="} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "57+8="}], "logprobs": True})
    response = httpx.post(gateway_process.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    bounds = {"logprobs": r"\[0, 20\]", "top_logprobs": r"\[0, 20\]", **RANGES}
    assert re.search(rf"^{name} must be in {bounds[name]}, got ", response.json()["error"]["message"]), response.text
    CASES["refused"] += 1


# --- the inputs of issues 12 and 15 out of range: refused by name and range -----------------------------------------
new_out_of_range = st.one_of(
    st.tuples(st.sampled_from(["min_tokens", "min_length"]),
              st.one_of(st.integers(-(2**31), -1), st.integers(5, 2**31 - 1))),  # max_tokens is 4
    st.tuples(st.just("remask_threshold"), st.one_of(st.floats(max_value=0.0, width=32),
                                                     st.floats(min_value=1.0, width=32), st.just(math.nan))),
    st.tuples(st.just("max_remasks"), st.integers(-(2**31), -1)),
)
NEW_RANGES = {"min_tokens": r"\[0, 4\] \(at most max_tokens\)", "min_length": r"\[0, 4\] \(at most max_tokens\)",
              "remask_threshold": r"\(0, 1\)", "max_remasks": r"\[0, 2147483647\]"}
unknown_keys = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12).filter(
    lambda k: k not in SAMPLING)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=st.one_of(new_out_of_range, st.tuples(st.just("sampling_parameters"), unknown_keys),
                     st.tuples(st.just("not json"), st.text(max_size=20).filter(lambda t: not _is_json(t)))),
       stream=st.booleans(), mode=st.sampled_from(["ar", "diffusion", "speculative"]))
def test_out_of_range_new_inputs_and_bad_sampling_parameters_are_refused_by_name(triton, bad, stream, mode):
    CASES["grpc"] += 1
    name, value = bad
    if name == "sampling_parameters":  # a known key beside an unknown one: the unknown one is named
        values: dict[str, Any] = {name: json.dumps({"max_tokens": 4, value: 1})}
        expected = rf"^sampling_parameters key {re.escape(repr(value))} is unknown: expected some of "
    elif name == "not json":
        values, expected = {"sampling_parameters": value}, r"^input 'sampling_parameters' is not valid JSON: "
    else:
        values, expected = {name: value}, rf"^{name} must be in {NEW_RANGES[name]}, got "
    with pytest.raises(Exception) as raised:
        grpc_generate(triton.grpc_url, "57+8=", mode=mode, stream=stream, max_tokens=4, **values)
    message = re.sub(r"^\[StatusCode\.\w+\] ", "", str(raised.value))  # the status tritonclient may put first
    assert re.search(expected, message), message
    CASES["refused"] += 1
    still_serving(triton)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@settings(max_examples=EXAMPLES // 4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=st.one_of(
    st.tuples(st.just("min_tokens"), st.one_of(st.integers(-(2**31), -1), st.integers(5, 2**31 - 1))),
    st.tuples(st.just("remask_threshold"), st.one_of(st.floats(max_value=0.0, allow_infinity=False),
                                                     st.floats(min_value=1.0, allow_infinity=False))),
    st.tuples(st.just("max_remasks"), st.integers(-(2**31), -1))),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), stream=st.booleans())
def test_gateway_refuses_out_of_range_new_fields_with_400(gateway_process, bad, path, stream):
    import httpx

    CASES["gateway"] += 1
    name, value = bad
    body: dict[str, Any] = {"model": "dlm", "max_tokens": 4, "stream": stream, name: value}
    body.update({"prompt": "57+8="} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "57+8="}]})
    response = httpx.post(gateway_process.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert re.search(rf"^{name} must be in {NEW_RANGES[name]}, got ", response.json()["error"]["message"]), response.text
    CASES["refused"] += 1


def test_report_the_cases_tried(tmp_path_factory):
    """Runs after the two properties (file order): the count goes to the output and a JSON file."""
    tried = CASES["grpc"] + CASES["http"] + CASES["gateway"]
    print(f"\nfuzz cases tried: {tried} ({CASES})")
    (tmp_path_factory.getbasetemp() / "fuzz_cases.json").write_text(json.dumps(CASES))
    assert tried >= EXAMPLES or tried == 0  # 0 when run alone with -k
