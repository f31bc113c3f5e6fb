"""Through a real tritonserver: requests that each fit the server never fail because of each other. Before the pass
planner, a long prompt arriving while another request was deep in its answer made one pass of P + T beyond the
artifact's context, and both requests failed ("past_plus_tokens = ... is outside the range")."""

from __future__ import annotations

import threading
import time

from triton_server import grpc_generate

LONG_PROMPT = "1+" * 450  # 900 characters: the miniature's tokenizer is character-level
DEEP_PROMPT = "2+" * 200  # 400 characters, then 200 tokens of ar: the cache passes 400 at once


def test_a_long_prompt_beside_a_deep_answer_fails_neither(triton):
    results: dict = {}
    answering = threading.Event()  # the deep request's first token came: its prefill is done

    def deep() -> None:
        try:
            # ignore_eos: all 200 tokens, so 199 are still to come when the long prompt is sent
            results["deep"] = grpc_generate(triton.grpc_url, DEEP_PROMPT, mode="ar", max_tokens=200,
                                            ignore_eos=True, stream=True, timeout=300,
                                            on_response=lambda response: answering.set())
        except Exception as e:  # noqa: BLE001 - reported by the asserts below
            results["deep"] = e
        results["deep_ended"] = time.monotonic()

    thread = threading.Thread(target=deep)
    thread.start()
    assert answering.wait(120), "the deep request never answered"  # it decodes with a cache of 400+ positions
    sent = time.monotonic()
    long_answer = grpc_generate(triton.grpc_url, LONG_PROMPT, mode="diffusion", max_tokens=16, timeout=300)
    thread.join(300)
    deep_responses = results["deep"]
    assert not isinstance(deep_responses, Exception), deep_responses
    assert isinstance(deep_responses, list) and deep_responses[-1]["finish_reason"] is not None
    assert results["deep_ended"] > sent  # they did overlap: the long prompt arrived mid-answer
    assert long_answer[-1]["finish_reason"] is not None
    # and each is what it is alone
    assert long_answer[-1]["text"] == grpc_generate(triton.grpc_url, LONG_PROMPT, mode="diffusion",
                                                    max_tokens=16)[-1]["text"]
