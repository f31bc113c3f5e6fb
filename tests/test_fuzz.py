"""Property-based requests against the real server (hypothesis), over gRPC, Triton's HTTP generate endpoints and the
OpenAI-compatible gateway. Each case starts from a valid request and changes one or two of its fields, each to a
valid value or to an invalid one (out of range, the wrong dtype or shape, not UTF-8, an unknown input...). The oracle
is exact: a case whose changes are all valid is decoded, one with an invalid change is refused with an error that
names what is wrong (gRPC and the gateway) or says something (HTTP), and the server keeps serving. Each endpoint's
property also asserts that at least MIN_DECODED of its cases were decoded and MIN_REFUSED refused, so it tests
both paths whatever file order or selection runs it; the counts go to build/reports/fuzz.json (one entry per
endpoint) and to the output."""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from dlm.inputs import SAMPLING_KEYS
from triton_server import REPOSITORY, engine_top_k, grpc_generate, http_post

EXAMPLES = 100  # cases per endpoint: a fixed budget, so the suite's time stays bounded
MIN_DECODED, MIN_REFUSED = 0.30, 0.25  # floors on each endpoint's shares
REPORT = ROOT / "build" / "reports" / "fuzz.json"
K = engine_top_k()  # the artifact's candidates per position: top_k's bound
PROFILE = next(iter(json.loads((REPOSITORY / "dlm" / "1" / "engine" / "manifest.json").read_text())[
    "artifacts"].values()))["contract"]["profile"]
CONTEXT, MAX_BLOCK = PROFILE["past_plus_tokens"][2], PROFILE["positions"][2]  # the server's context, longest block
MAX_TOKENS = 12  # a valid max_tokens is at most this (short decodes keep the suite fast)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server: report the case
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
PROMPTS = ["4821+377=", "57+8=", "upper:abcdefghij=", "upper:xyz=", "naïve café 日本語 😀"]
SPEC = {  # the contract's dtypes (DESIGN §5)
    "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "seed": "UINT64",
    "stop_words": "BYTES", "mode": "BYTES", "block_length": "INT32", "threshold": "FP32", "steps": "INT32",
    "top_k": "INT32", "top_p": "FP32", "return_log_probs": "BOOL", "top_logprobs": "INT32",
    "remask_threshold": "FP32", "max_remasks": "INT32", "min_tokens": "INT32", "min_length": "INT32",
    "ignore_eos": "BOOL", "exclude_input_in_output": "BOOL", "sampling_parameters": "BYTES", "draft_adapter": "BOOL",
    "add_special_tokens": "BOOL",
}
NUMPY: dict[str, Any] = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
                         "FP32": np.float32, "FP64": np.float64, "UINT64": np.uint64}


def report(endpoint: str, counts: dict[str, int]) -> None:
    """Print `counts` and merge them into build/reports/fuzz.json under `endpoint`."""
    print(f"\nfuzz {endpoint}: {counts}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    try:
        everything = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[endpoint] = counts
    REPORT.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")


def check_floors(endpoint: str, counts: dict[str, int]) -> None:
    report(endpoint, counts)
    tried = counts["decoded"] + counts["refused"]
    assert tried >= EXAMPLES, counts  # hypothesis ran every case (and the explicit examples)
    assert counts["decoded"] >= MIN_DECODED * tried, f"too few {endpoint} cases decoded: {counts}"
    assert counts["refused"] >= MIN_REFUSED * tried, f"too few {endpoint} cases refused: {counts}"


# --- one change to a request ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """A field of the valid request set to `value`: valid or not; `how` is "value", or for an invalid change that
    is not about the value "dtype" (sent as another dtype), "shape" (two values for one) or "unknown" (an input the
    model does not declare)."""

    field: str
    value: Any
    valid: bool
    how: str = "value"
    dtype: str | None = None  # the dtype sent, for how == "dtype"


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], its bounds drawn often: an off-by-one at either end is caught."""
    return st.one_of(st.sampled_from([low, high]), st.integers(low, high))


text = st.text(string.ascii_letters + string.digits + "+= ", max_size=6)
int32 = st.integers(-(2**31), 2**31 - 1)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
# per input: (valid values, invalid values); valid values are valid whatever else the case changes (a valid
# min_tokens is at most 1, at most any valid max_tokens; a valid steps is at most 2, within any valid block)
TENSOR_FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy | None]] = {
    "text_input": (st.sampled_from(PROMPTS),
                   st.one_of(st.just(""), st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)),
                             st.integers(CONTEXT, 4 * CONTEXT).map(lambda n: "7" * n),  # beyond the context
                             st.just("7" * (64 * CONTEXT + 1)))),  # beyond any prompt's bytes
    "max_tokens": (ints(1, MAX_TOKENS), st.one_of(ints(-(2**31), 0), ints(CONTEXT, 2**31 - 1))),
    "stream": (st.booleans(), None),
    "temperature": (st.sampled_from([0.0, 0.7, 1.5]), st.one_of(st.floats(max_value=-0.5, width=32), not_finite)),
    "seed": (st.integers(0, 2**64 - 1), None),
    "stop_words": (st.one_of(st.lists(text.filter(bool), max_size=3), st.just(["s" * 256] * 16)),
                   st.one_of(st.lists(text, min_size=17, max_size=20), st.just(["x" * 257]),
                             st.just([b"\xff\xfe"]))),
    "mode": (st.sampled_from(["ar", "diffusion", "speculative"]),
             st.one_of(st.sampled_from(["", "AR", "fast", "diffusion "]), st.just(b"\xc3"))),
    "block_length": (ints(2, MAX_BLOCK), st.one_of(ints(-(2**31), 1), ints(MAX_BLOCK + 1, 2**31 - 1))),
    "threshold": (st.one_of(st.just(1.0), st.floats(0.05, 1.0)), st.one_of(st.floats(max_value=0.0, width=32),
                                                             st.floats(min_value=1.0, exclude_min=True, width=32),
                                                             st.just(math.nan))),
    "steps": (ints(1, 2), st.one_of(ints(-(2**31), 0), ints(MAX_BLOCK + 1, 2**31 - 1))),
    "top_k": (ints(1, K), st.one_of(ints(-(2**31), 0), ints(K + 1, 2**31 - 1))),
    "top_p": (st.one_of(st.just(1.0), st.floats(0.05, 1.0)), st.one_of(st.floats(max_value=0.0, width=32),
                                                         st.floats(min_value=1.0, exclude_min=True, width=32),
                                                         st.just(math.nan))),
    "return_log_probs": (st.booleans(), None),
    "top_logprobs": (ints(0, min(20, K)), st.one_of(ints(-(2**31), -1), ints(min(20, K) + 1, 2**31 - 1))),
    "remask_threshold": (st.floats(0.05, 0.95), st.one_of(st.floats(max_value=0.0, width=32),
                                                                     st.floats(min_value=1.0, width=32),
                                                                     st.just(math.nan))),
    "max_remasks": (ints(0, 8), ints(-(2**31), -1)),
    "min_tokens": (ints(0, 1), st.one_of(ints(-(2**31), -1), ints(MAX_TOKENS + 1, 2**31 - 1))),
    "min_length": (ints(0, 1), st.one_of(ints(-(2**31), -1), ints(MAX_TOKENS + 1, 2**31 - 1))),
    "ignore_eos": (st.booleans(), None),
    "exclude_input_in_output": (st.booleans(), None),
    "draft_adapter": (st.booleans(), None),
    "add_special_tokens": (st.booleans(), None),
    "sampling_parameters": (st.fixed_dictionaries({}, optional={
        "temperature": st.sampled_from([0, 0.5, "0.5"]), "top_p": st.floats(0.1, 1.0), "top_k": st.integers(-1, K),
        "seed": st.integers(0, 2**64 - 1), "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=2)),
        "ignore_eos": st.booleans(), "threshold": st.floats(0.05, 1.0), "remask_threshold": st.floats(0.05, 0.95),
        "max_remasks": st.integers(0, 8), "draft_adapter": st.booleans()}).map(json.dumps),
        st.one_of(st.sampled_from(["", "{", "[]", "null", "3", '"text"', '{"frobnicate": 1}', '{"max_tokens": 0}',
                                   '{"temperature": "hot"}', '{"stop": 7}', '{"ignore_eos": "maybe"}',
                                   '{"mode": "ar", "max_tokens": 4}']),  # the last disagrees with the request
                  st.just(b"\xff{}"))),
}
# a valid pair that is not valid together: min_length and min_tokens name one setting and must agree; a
# sampling_parameters key beside its own input must agree too (below, the valid JSON leaves out the other field)
EXCLUSIVE = {frozenset({"min_tokens", "min_length"})}


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@st.composite
def tensor_cases(draw, http: bool = False) -> tuple[dict[str, Any], list[Change]]:
    """A valid request ({input: value}) and one or two changes to it. `http`: for Triton's HTTP generate
    endpoints, whose JSON body holds text, not bytes (so no invalid UTF-8), and which take a key that names no
    input as a request parameter (so no unknown input)."""
    base = {"text_input": draw(st.sampled_from(PROMPTS)), "max_tokens": draw(st.integers(1, MAX_TOKENS)),
            "mode": draw(st.sampled_from(["ar", "diffusion", "speculative"]))}
    names = [*TENSOR_FIELDS] + ["unknown input"] * (not http)
    fields = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)
                  .filter(lambda f: frozenset(f) not in EXCLUSIVE))
    changes = []
    for field in fields:
        if field == "unknown input":
            changes.append(Change(draw(st.sampled_from(["max_new_tokens", "prompt", "n", "Stream"])), 1, False,
                                  "unknown"))
            continue
        valid, invalid = TENSOR_FIELDS[field]
        kinds = ["valid"] * 5 + ["dtype"] + ["shape"] * (field != "stop_words") + ["value"] * 2 * (invalid is not None)
        kind = draw(st.sampled_from(kinds))
        if kind == "valid":
            value = draw(valid)
            if field == "sampling_parameters":  # a key that another change sets would have to agree with it
                value = json.dumps({k: v for k, v in json.loads(value).items()
                                    if not {k, {"stop": "stop_words"}.get(k)} & set(fields)})
            changes.append(Change(field, value, True))
        elif kind == "value":
            assert invalid is not None
            strategy = invalid.filter(lambda v: not isinstance(v, bytes) and
                                      not (isinstance(v, list) and any(isinstance(w, bytes) for w in v))) \
                if http else invalid
            changes.append(Change(field, draw(strategy), False))
        elif kind == "dtype":
            changes.append(Change(field, draw(valid), False, kind, draw(st.sampled_from(
                sorted(set(NUMPY) - {SPEC[field]})))))
        else:
            changes.append(Change(field, draw(valid), False, kind))
    return base, changes


def refusal_names(change: Change) -> re.Pattern:
    """What an error refusing `change` must mention."""
    names = {"min_tokens": "min_tokens|min_length", "min_length": "min_tokens|min_length",
             "sampling_parameters": "sampling_parameters", "stop_words": "stop_words",
             "messages": "messages|prompt"}  # a chat prompt beyond the context: the rendered prompt is named
    return re.compile(names.get(change.field, re.escape(change.field)))


def tensors(base: dict[str, Any], changes: list[Change]) -> dict[str, tuple[str, np.ndarray]]:
    """{input: (dtype, array)} of the changed request."""
    values = {**base, **{c.field: c.value for c in changes}}
    how = {c.field: c for c in changes}
    out = {}
    for name, value in values.items():
        change = how.get(name)
        dtype = change.dtype if change and change.how == "dtype" else SPEC.get(name, "INT32")
        array = np.array((value or [""]) if name == "stop_words" else [value], dtype=np.object_)
        if change and change.how == "shape":
            array = np.repeat(array, 2)
        out[name] = (str(dtype), array)
    return out


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


def as_grpc(request: dict[str, tuple[str, np.ndarray]]) -> list:
    inputs = []
    for name, (dtype, array) in request.items():
        array = as_dtype(dtype, array)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def as_json(request: dict[str, tuple[str, np.ndarray]]) -> dict[str, Any]:
    """Triton's generate body: one value per input (a list for stop_words or a wrong shape); a wrong dtype is sent
    as the wrong JSON type (text for a number or a bool, a number for text)."""
    body: dict[str, Any] = {}
    for name, (dtype, array) in request.items():
        items = [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]
        if dtype != SPEC[name]:
            items = [len(v) if isinstance(v, str) else str(v) for v in items]
        body[name] = items if len(items) != 1 or name == "stop_words" else items[0]
    return body


def expect(changes: list[Change], error: str | None, names: bool = True) -> str:
    """'decoded' or 'refused', checked against the changes: every valid case decoded, every invalid one refused
    (with `names`, by an error that names one of its invalid changes)."""
    invalid = [c for c in changes if not c.valid]
    if error is None:
        assert not invalid, f"decoded, but {invalid} is invalid"
        return "decoded"
    assert error.strip() and not re.fullmatch(r"\s*(None|)\s*", error), "an empty error message"
    assert invalid, f"refused, but every change is valid: {changes}\n{error}"
    if names:
        assert any(refusal_names(c).search(error) for c in invalid), (invalid, error)
    return "refused"


def still_serving(triton) -> None:
    assert grpc_generate(triton.grpc_url, "57+8=", mode="ar", max_tokens=4, timeout=60)[0]["text"] is not None


def test_grpc_requests_are_decoded_or_refused_by_name(triton):
    counts = {"decoded": 0, "refused": 0}

    @FUZZ
    @given(case=tensor_cases())
    def one(case):
        base, changes = case
        try:
            responses = grpc_generate(triton.grpc_url, "", inputs=as_grpc(tensors(base, changes)), timeout=60)
            error = None
            assert responses and responses[-1]["finish_reason"] in ("stop", "length"), responses
        except (TimeoutError, __import__("queue").Empty) as e:
            pytest.fail(f"no answer within 60 s: {e!r} for {changes}")
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - the server's error, carried by tritonclient
            error = str(e)
        outcome = expect(changes, error)
        counts[outcome] += 1
        if outcome == "refused":
            still_serving(triton)

    one()
    still_serving(triton)
    check_floors("grpc", counts)


def test_http_generate_requests_are_decoded_or_refused(triton):
    counts = {"decoded": 0, "refused": 0}

    @FUZZ
    @given(case=tensor_cases(http=True), stream_endpoint=st.booleans())
    def one(case, stream_endpoint):
        base, changes = case
        body = as_json(tensors(base, changes))
        # /generate takes exactly one response: a streamed request goes to /generate_stream
        endpoint = "generate_stream" if stream_endpoint or body.get("stream") is True else "generate"
        status, text = http_post(triton.http_url, endpoint, body)
        events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
        documents = events if endpoint == "generate_stream" and events else [json.loads(text)]
        errors = [d["error"] for d in documents if "error" in d]
        if status == 200 and not errors:
            assert "text_output" in documents[-1], documents
            outcome = expect(changes, None)
        else:
            # the model's own refusals are 400; Triton's JSON-to-tensor parser answers a wrong JSON type with 500
            assert errors, (status, text)
            assert 400 <= status < 500 or (status == 500 and errors[0].startswith("Unable to parse")) or (
                status == 200 and endpoint == "generate_stream"), (status, text)  # an error event in the stream
            outcome = expect(changes, errors[0], names=False)
        counts[outcome] += 1
        if outcome == "refused":
            still_serving(triton)

    one()
    still_serving(triton)
    check_floors("http", counts)


# --- the gateway ---------------------------------------------------------------------------------------------------
def one_key(name: str, valid: st.SearchStrategy, invalid: st.SearchStrategy) -> tuple[st.SearchStrategy, ...]:
    """A field that sets one key of the body."""
    return valid.map(lambda v: {name: v}), invalid.map(lambda v: {name: v})


words = st.lists(text.filter(bool), max_size=3)
BOTH: dict[str, tuple[st.SearchStrategy, ...]] = {  # fields of both endpoints: (valid bodies' keys, invalid ones)
    "max_tokens": one_key("max_tokens", ints(1, MAX_TOKENS),
                          st.one_of(st.integers(-5, 0), st.integers(CONTEXT, 2**31 - 1), st.just("many"))),
    "temperature": one_key("temperature", st.sampled_from([0, 0.5, 1.2]), st.sampled_from([-0.5, "hot", [0]])),
    "stream": one_key("stream", st.booleans(), st.sampled_from([3, "maybe", [True]])),
    "mode": one_key("mode", st.sampled_from(["ar", "diffusion", "speculative"]), st.sampled_from(["fast", 7, ""])),
    "threshold": one_key("threshold", st.floats(0.05, 1.0), st.sampled_from([0, 1.5, -1, "high"])),
    "steps": one_key("steps", st.integers(1, 2), st.sampled_from([0, -3, MAX_BLOCK + 1, "x"])),
    "block_length": one_key("block_length", ints(2, MAX_BLOCK), st.sampled_from([0, 1, MAX_BLOCK + 1, "x"])),
    "top_k": one_key("top_k", ints(-1, K), st.one_of(ints(K + 1, 2**31 - 1), st.just("x"))),
    "top_p": one_key("top_p", st.floats(0.05, 1.0), st.sampled_from([0, 1.5, -1, "x"])),
    "seed": one_key("seed", st.integers(0, 2**63 - 1), st.sampled_from([-1, "x", 1.5])),
    "stop": one_key("stop", st.one_of(text.filter(bool), words, st.just(["s" * 256] * 16)),
                    st.one_of(st.lists(text, min_size=17, max_size=20), st.sampled_from([5, [1], ["x" * 257]]))),
    "min_tokens": one_key("min_tokens", st.integers(0, 1), st.sampled_from([-1, MAX_TOKENS + 1, 10**6, "x"])),
    "ignore_eos": one_key("ignore_eos", st.booleans(), st.sampled_from(["maybe", 3])),
    "remask_threshold": one_key("remask_threshold", st.floats(0.05, 0.95), st.sampled_from([0, 1, 1.5, "x"])),
    "max_remasks": one_key("max_remasks", st.integers(0, 8), st.sampled_from([-1, "x"])),
    "draft_adapter": one_key("draft_adapter", st.booleans(), st.sampled_from(["maybe", 3])),
    "n": one_key("n", st.just(1), st.sampled_from([0, 2, 5])),
    "stream_options": one_key("stream_options", st.fixed_dictionaries({}, optional={
        "include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
        st.sampled_from([3, {"include_usage": "maybe"}])),
    "model": one_key("model", st.just("dlm"), st.sampled_from(["gpt-4", 3, None])),
    "frequency_penalty": one_key("frequency_penalty", st.sampled_from([0, 0.5, -1, 2]),  # honoured in [-2, 2]
                                 st.sampled_from([2.5, -3, "x"])),
    "unknown field": (st.just({"user": "someone"}), st.sampled_from([{"frobnicate": 1}, {"max_new_tokens": 4}])),
    "body": (st.just({}), st.just({})),  # invalid: the body is not JSON, or not a JSON object (below)
}
COMPLETIONS = {
    "prompt": one_key("prompt", st.one_of(st.sampled_from(PROMPTS), st.sampled_from(PROMPTS).map(lambda p: [p])),
                      st.sampled_from([[], 5, [1, 2], "", None, "7" * 2 * CONTEXT,  # beyond the context
                                       "7" * (64 * CONTEXT + 1)])),  # beyond any prompt's bytes
    "logprobs": one_key("logprobs", ints(0, 20), st.sampled_from([21, -1, "x"])),
    "echo": one_key("echo", st.just(False), st.just(True)),
    "best_of": one_key("best_of", st.just(1), st.sampled_from([2, 3])),
    "suffix": one_key("suffix", st.just(""), st.sampled_from(["x", "}"])),
}
CHAT = {
    "messages": one_key("messages", st.sampled_from(PROMPTS).map(
        lambda p: [{"role": "user", "content": p}]) | st.sampled_from(PROMPTS).map(
        lambda p: [{"role": "user", "content": [{"type": "text", "text": p}]}]),
        st.sampled_from([[], "hi", [{"role": "robot", "content": "hi"}], [{"content": "hi"}],
                         [{"role": "user", "content": "7" * 2 * CONTEXT}]])),
    "logprobs": (ints(0, 20).map(lambda n: {"logprobs": True, "top_logprobs": n}),
                 st.sampled_from([{"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 3},
                                  {"logprobs": "x"}])),
    "max_completion_tokens": one_key("max_completion_tokens", st.integers(1, MAX_TOKENS), st.sampled_from([0, "x"])),
}


@st.composite
def gateway_cases(draw) -> tuple[str, bytes, list[Change]]:
    """A path, a body (a valid one with one or two fields changed), and the changes."""
    chat = draw(st.booleans())
    fields = {**BOTH, **(CHAT if chat else COMPLETIONS)}
    body: dict[str, Any] = {"model": "dlm", "max_tokens": draw(st.integers(1, MAX_TOKENS)),
                            "mode": draw(st.sampled_from(["ar", "diffusion", "speculative"]))}
    prompt = draw(st.sampled_from(PROMPTS))
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    changes = []
    for field in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True)):
        valid, invalid = fields[field]
        ok = field != "body" and draw(st.sampled_from([False, True, True]))
        keys = draw(valid if ok else invalid)
        body.update(keys)
        changes.append(Change(next(iter(keys), field) if field != "unknown field" else next(iter(keys)), keys, ok))
    raw = json.dumps({k: v for k, v in body.items() if v is not None}).encode()  # None: the field left out
    if any(c.field == "body" for c in changes):
        raw = draw(st.sampled_from([b"", b"{", b"[1, 2]", b'"dlm"', b"\xff\xfe", b"null"]))
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw, changes


def test_gateway_bodies_are_decoded_or_refused_by_name(gateway_process):
    import httpx

    counts = {"decoded": 0, "refused": 0}

    long_stop = {"model": "dlm", "prompt": "57+8=", "max_tokens": 4, "stop": ["s"] * 17}
    long_prompt = {"model": "dlm", "prompt": "7" * (64 * CONTEXT + 1), "max_tokens": 4}

    @FUZZ
    @given(case=gateway_cases())
    # refusals that reach Triton and come back on the stream without a status code: the gateway tells a client's
    # error from a server's by their wording (client/result.py), so each kind is tried at least once
    @example(case=("/v1/completions", json.dumps(long_stop).encode(), [Change("stop", long_stop, False)]))
    @example(case=("/v1/completions", json.dumps(long_prompt).encode(), [Change("prompt", long_prompt, False)]))
    def one(case):
        path, raw, changes = case
        response = httpx.post(gateway_process.url + path, content=raw,
                              headers={"Content-Type": "application/json"}, timeout=60)
        if response.status_code == 200:
            events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events if e != "[DONE]"]
            errors = [c["error"]["message"] for c in chunks if "error" in c]
            assert not errors, (changes, errors)  # a refusal comes before the stream starts
            outcome = expect(changes, None)
        else:
            assert 400 <= response.status_code < 500, (response.status_code, response.text)  # the client's fault
            error = response.json()["error"]
            assert error["type"] and isinstance(error["message"], str), error
            message = f"{error['message']} (param {error.get('param')})"
            if any(c.field == "body" for c in changes):
                assert re.search(r"JSON|body", message), message
                outcome = expect(changes, message, names=False)
            else:
                outcome = expect(changes, message)
        counts[outcome] += 1

    one()
    valid = httpx.post(gateway_process.url + "/v1/completions", json={"model": "dlm", "prompt": "57+8=", "max_tokens": 4},
                       timeout=60)
    assert valid.status_code == 200, valid.text
    check_floors("gateway", counts)


# --- out-of-range sampling controls and log probs: refused by name and range -------------------------------------
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
    name, value = bad
    with pytest.raises(Exception) as raised:
        grpc_generate(triton.grpc_url, "57+8=", mode=mode, stream=stream, max_tokens=4, **{name: value})
    assert re.search(rf"^{name} must be in {RANGES[name]}, got ", str(raised.value).split("] ", 1)[-1]), raised.value
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

    path, name, value = bad
    body: dict[str, Any] = {"model": "dlm", "max_tokens": 4, "stream": stream, name: value}
    body.update({"prompt": "57+8="} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "57+8="}], "logprobs": True})
    response = httpx.post(gateway_process.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    bounds = {"logprobs": r"\[0, 20\]", "top_logprobs": r"\[0, 20\]", **RANGES}
    assert re.search(rf"^{name} must be in {bounds[name]}, got ", response.json()["error"]["message"]), response.text


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
    lambda k: k not in SAMPLING_KEYS)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=st.one_of(new_out_of_range, st.tuples(st.just("sampling_parameters"), unknown_keys),
                     st.tuples(st.just("not json"), st.text(max_size=20).filter(lambda t: not _is_json(t)))),
       stream=st.booleans(), mode=st.sampled_from(["ar", "diffusion", "speculative"]))
def test_out_of_range_new_inputs_and_bad_sampling_parameters_are_refused_by_name(triton, bad, stream, mode):
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

    name, value = bad
    body: dict[str, Any] = {"model": "dlm", "max_tokens": 4, "stream": stream, name: value}
    body.update({"prompt": "57+8="} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "57+8="}]})
    response = httpx.post(gateway_process.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert re.search(rf"^{name} must be in {NEW_RANGES[name]}, got ", response.json()["error"]["message"]), response.text
