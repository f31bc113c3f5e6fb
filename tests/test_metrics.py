"""The model's metrics through a real tritonserver move as the requests sent say they must: prompt tokens by what
was sent, one queue wait and one time to first block per request (the first no longer than the second, the second
no longer than the client saw), every pass's tokens counted with at most the planner's 25 % padding, and the KV
positions in use covering a live request's cache, back to 0 once it has gone."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import tritonclient.grpc as grpcclient

from conftest import ROOT
from dlm.text import TextCodec
from export.tasks import held_out_set
from triton_server import grpc_generate, grpc_inputs, wait_until

TOKENIZER = ROOT / "model_repository" / "dlm" / "1" / "tokenizer"
MODES = ["ar", "diffusion", "speculative"]


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def idle(server) -> dict[str, float]:
    """The metrics once the server decodes nothing: a request an earlier test left behind would move them."""
    metrics = wait_until(server, lambda m: m["dlm_live_slots"] == 0 and m["dlm_queue_depth"] == 0)
    assert metrics["dlm_live_slots"] == 0 and metrics["dlm_queue_depth"] == 0
    return metrics


def first_response_seconds(url: str, prompt: str, mode: str) -> float:
    """Seconds from sending a streamed request to its first response, read from the stream as it comes."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
    try:
        start = time.perf_counter()
        client.async_stream_infer("dlm", grpc_inputs(prompt, mode=mode, max_tokens=40, stream=True),
                                  enable_empty_final_response=True)
        first = None
        while True:
            at, result, error = results.get(timeout=120)
            assert error is None, error
            if first is None and result.as_numpy("text_output") is not None:
                first = at - start
            if result.get_response().parameters["triton_final_response"].bool_param:
                assert first is not None
                return first
    finally:
        client.stop_stream()
        client.close()


def test_prompt_tokens_queue_wait_first_block_and_pass_tokens_move_with_requests(triton):
    codec = TextCodec(TOKENIZER)
    problems = held_out_set("upper", 3) + held_out_set("addition", 3)
    requests = [(p.prompt, MODES[i % 3]) for i, p in enumerate(problems)]
    before = idle(triton)
    with ThreadPoolExecutor(len(requests)) as pool:  # together: several rows per step, some passes shared
        client_first = list(pool.map(lambda r: first_response_seconds(triton.grpc_url, *r), requests))
    sent = {mode: [i for i, (_, m) in enumerate(requests) if m == mode] for mode in MODES}

    def recorded(m: dict[str, float]) -> bool:
        """Every request's first block, then the KV positions back to 0: the updates queued after the last pass,
        so every pass has been counted (the metrics thread applies them in order)."""
        return m["dlm_kv_positions"] == 0 and all(
            delta(m, before, f'dlm_time_to_first_block_seconds_count{{mode="{mode}"}}') >= len(sent[mode])
            for mode in MODES)

    after = wait_until(triton, recorded)
    for mode, indices in sent.items():
        labels = f'{{mode="{mode}"}}'
        prompt_tokens = sum(len(codec.encode(requests[i][0])) for i in indices)
        assert delta(after, before, f"dlm_prompt_tokens_total{labels}") == prompt_tokens
        assert delta(after, before, f"dlm_queue_wait_seconds_count{labels}") == len(indices)
        assert delta(after, before, f"dlm_time_to_first_block_seconds_count{labels}") == len(indices)
        wait = delta(after, before, f"dlm_queue_wait_seconds_sum{labels}")
        first_block = delta(after, before, f"dlm_time_to_first_block_seconds_sum{labels}")
        # each request's first block comes after its admission and its prefill, before its first response
        assert 0 <= wait < first_block <= sum(client_first[i] for i in indices)

    passes = delta(after, before, "dlm_engine_passes_total")
    real = delta(after, before, 'dlm_pass_tokens_total{kind="real"}')
    padding = delta(after, before, 'dlm_pass_tokens_total{kind="padding"}')
    all_prompt_tokens = sum(len(codec.encode(p)) for p, _ in requests)
    assert passes >= len(requests) and real >= all_prompt_tokens + passes - len(requests)
    assert 0 <= padding <= real + padding
    assert delta(after, before, "dlm_pass_padding_ratio_count") == passes
    # the planner pads no pass beyond 25 % of its tokens
    assert delta(after, before, 'dlm_pass_padding_ratio_bucket{le="0.25"}') == passes
    assert after["dlm_kv_positions"] == 0 and after["dlm_live_slots"] == 0


def test_kv_positions_cover_a_live_request_and_return_to_zero(triton):
    prompt = "2+" * 200  # 400 characters, then 200 ar passes: long enough to watch
    prompt_tokens = len(TextCodec(TOKENIZER).encode(prompt))
    done = threading.Event()
    result: dict = {}
    idle(triton)

    def decode() -> None:
        try:
            result["responses"] = grpc_generate(triton.grpc_url, prompt, mode="ar", max_tokens=200, timeout=300)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
        done.set()

    threading.Thread(target=decode, daemon=True).start()
    seen = []
    while not done.is_set():
        seen.append(triton.metrics()["dlm_kv_positions"])
        time.sleep(0.02)
    assert "error" not in result, result.get("error")
    generated = result["responses"][-1]["num_tokens"]
    assert max(seen) >= prompt_tokens  # its prompt was in the cache while it decoded
    assert max(seen) <= prompt_tokens + generated
    assert wait_until(triton, lambda m: m["dlm_kv_positions"] == 0)["dlm_kv_positions"] == 0
