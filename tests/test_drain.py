"""Graceful drain of a replica (a pod of the Helm chart: Triton and the gateway beside it), on this machine.

A tritonserver with 2 slots and the gateway beside it take 2 long streams and 2 long unary requests (2 running, 2
waiting in the model's queue). Then both processes get SIGTERM at the same moment, as the kubelet sends it to both
containers after their preStop sleep. Required:

- the gateway's /health (the pod's readiness probe) answers 503 within 1 s;
- while requests run the gateway stays up: a new request is refused with 503 (code "draining"), never
  half-served;
- every request that was running or waiting when SIGTERM came finishes whole: 0 lost;
- both processes exit by themselves with status 0, within the pod's grace period (45 s in the chart).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from triton_server import Gateway, TritonServer, prepare_repository, repository_with

SLOTS = 2
TOKENS = 400  # a few seconds per pair of requests here
PROMPT = "1+" * 20
GRACE_SECONDS = 45  # the chart's triton.terminationGracePeriodSeconds


def body(stream: bool) -> dict[str, Any]:
    return {"model": "dlm", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "mode": "ar",
            "ignore_eos": True, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}


def complete(url: str, stream: bool, out: dict[str, Any]) -> None:
    """One completion through the gateway; `out` gets its status, tokens, finish reason or error, and `started`
    once a stream has its first chunk."""
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            if not stream:
                response = client.post("/v1/completions", json=body(False))
                out["status"] = response.status_code
                answer = response.json()
                if response.status_code == 200:
                    out["tokens"] = answer["usage"]["completion_tokens"]
                    out["finish_reason"] = answer["choices"][0]["finish_reason"]
                else:
                    out["error"] = answer
                return
            with client.stream("POST", "/v1/completions", json=body(True)) as response:
                out["status"] = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        out["error"] = event["error"]
                    elif event["choices"]:
                        out["started"] = True
                        out["finish_reason"] = event["choices"][0]["finish_reason"] or out.get("finish_reason")
                    elif event.get("usage"):
                        out["tokens"] = event["usage"]["completion_tokens"]
    except Exception as error:  # noqa: BLE001 - a lost request is what the test counts
        out["error"] = repr(error)


@pytest.mark.slow
def test_sigterm_under_load_loses_no_running_request_and_turns_unready_at_once(tmp_path):
    prepare_repository()
    repository = repository_with(tmp_path / "repository", max_live=str(SLOTS), runtime_threads="1",
                                 runtime_spin="false")
    server = TritonServer(repository, tmp_path / "server.log")
    gateway: Gateway | None = None
    try:
        server.wait_ready(timeout=180)
        gateway = Gateway(server.grpc_url, tmp_path / "gateway.log", triton_metrics=server.metrics_url,
                          extra_args=["--drain-seconds", "30"]).wait_ready()
        outcomes: list[dict[str, Any]] = [{} for _ in range(2 * SLOTS)]
        threads = [threading.Thread(target=complete, args=(gateway.url, i % 2 == 0, out))
                   for i, out in enumerate(outcomes)]
        # under load: every slot running (a stream past its first chunk among them), the rest waiting in the
        # model's queue. The first SLOTS requests (streamed and not) go first, so that the running ones are
        # known, whichever order the server would have taken them in; then the rest queue behind them.
        def wait_for(condition: Any) -> None:
            deadline = time.monotonic() + 60
            while True:
                gauges = server.metrics()
                if condition(gauges):
                    return
                assert time.monotonic() < deadline, (gauges, outcomes)
                time.sleep(0.02)

        for thread in threads[:SLOTS]:
            thread.start()
        wait_for(lambda gauges: gauges["dlm_live_slots"] == SLOTS and any(o.get("started") for o in outcomes))
        for thread in threads[SLOTS:]:
            thread.start()
        wait_for(lambda gauges: gauges["dlm_live_slots"] == SLOTS and gauges["dlm_queue_depth"] == SLOTS)
        assert not any("finish_reason" in o and o["finish_reason"] for o in outcomes), outcomes

        # SIGTERM to both, as the kubelet sends it to both containers
        sigterm = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        server.process.send_signal(signal.SIGTERM)
        # while requests run, the gateway stays up and says why: /health 503 (draining), not a closed port
        unready_after = None
        while unready_after is None and time.monotonic() - sigterm < 5:
            health = httpx.get(f"{gateway.url}/health", timeout=1)
            if health.status_code == 503:
                assert health.json()["draining"] is True and health.json()["running"] >= 1, health.text
                unready_after = time.monotonic() - sigterm
            time.sleep(0.01)
        assert unready_after is not None and unready_after <= 1.0, unready_after
        # a new request is refused at once, not half-served
        refused = httpx.post(f"{gateway.url}/v1/completions", json=body(False), timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining" and refused.headers["connection"] == "close"

        for thread in threads:
            thread.join(GRACE_SECONDS)
        gateway_code = gateway.process.wait(GRACE_SECONDS)
        gateway_exited = time.monotonic() - sigterm
        server_code = server.process.wait(GRACE_SECONDS)
        server_exited = time.monotonic() - sigterm
        lost = [o for o in outcomes if not (o.get("status") == 200 and o.get("tokens") == TOKENS
                                            and o.get("finish_reason") == "length" and "error" not in o)]
        assert lost == [], outcomes
        assert gateway_code == 0, gateway.log_path.read_text(errors="replace")[-3000:]
        assert server_code == 0, server.log_tail()
        assert max(gateway_exited, server_exited) < GRACE_SECONDS
        print(f"drain: {len(outcomes)} requests at SIGTERM ({SLOTS} running, {SLOTS} waiting), 0 lost; /health 503 "
              f"after {unready_after:.3f} s; gateway exited (0) after {gateway_exited:.1f} s, Triton (0) after "
              f"{server_exited:.1f} s")
    finally:
        if gateway is not None and gateway.process.poll() is None:
            gateway.process.kill()
        server.kill()
