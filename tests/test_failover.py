"""Failover through the gateway (issue 13 item 4): two real tritonservers on loopback behind
`python -m client.gateway --triton A,B`, one of them SIGKILLed (its whole process group) under a bounded load.

Each server decodes one request at a time (`max_live` 1), so what every request has received when the kill comes
is known, not raced:

- one endless stream per replica (`ENDLESS_PROMPT` in `ar`, hundreds of passes) that has delivered its first chunk:
  the one on the killed replica must fail with a clear error event, the other must finish whole;
- requests queued behind them (streams and unary, with a checkable answer) that have received no byte: none may
  fail (those on the killed replica are sent once more to the other);
- requests sent right after the kill, while the gateway learns of it: none may fail.

Then `/health` and `/metrics` must show the killed replica ejected and the other healthy; a server restarted on the
same ports must be probed back in, and take requests again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import triton_server
from export.tasks import held_out_set
from triton_server import ENDLESS_PROMPT, Gateway, TritonServer, prepare_repository, repository_with

PROBLEMS = held_out_set("upper", 4)
# an endless request as long as the miniature's context allows (991 there): seconds of passes, so it is still
# running when the kill comes, a few hundred milliseconds after its first chunk
LONG_TOKENS = 900
QUEUED = 4  # requests queued behind the endless ones, half on each replica: streams and unary, alternately
AFTER = 4  # requests sent right after the kill


@dataclass
class Outcome:
    """What one HTTP request through the gateway got."""

    prompt: str
    stream: bool
    status: int | None = None  # None: no response yet (not a byte)
    chunks: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # an OpenAI error object: the body of a refusal, or a stream's error event
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finish_reason is not None


def body(prompt: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    request = {"model": "dlm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "mode": "ar",
               "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request


async def complete(client: httpx.AsyncClient, out: Outcome, max_tokens: int = 48,
                   first_chunk: asyncio.Event | None = None) -> Outcome:
    """One completion (streamed or not), recorded in `out` as it goes; `first_chunk` is set once a chunk came."""
    if not out.stream:
        response = await client.post("/v1/completions", json=body(out.prompt, False, max_tokens))
        out.status = response.status_code
        answer = response.json()
        if response.status_code != 200:
            out.error = answer.get("error", answer)
        else:
            out.text, out.finish_reason = answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]
            out.usage = answer["usage"]
        return out
    async with client.stream("POST", "/v1/completions", json=body(out.prompt, True, max_tokens)) as response:
        out.status = response.status_code
        if response.status_code != 200:
            out.error = json.loads(await response.aread()).get("error")
            return out
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            out.events.append(data[:200])
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                out.error = event["error"]
            elif event["choices"]:
                choice = event["choices"][0]
                out.chunks += 1
                out.text += choice["text"]
                out.finish_reason = choice["finish_reason"] or out.finish_reason
                if first_chunk is not None:
                    first_chunk.set()
            else:
                out.usage = event.get("usage")
    return out


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/health")
    return {"status": response.status_code, **response.json()}


def replica(report: dict[str, Any], address: str) -> dict[str, Any]:
    return next(r for r in report["replicas"] if r["address"] == address)


async def until(client: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 30.0) -> dict[str, Any]:
    """Poll /health until `condition` holds for its report."""
    deadline = time.monotonic() + timeout
    while True:
        report = await health(client)
        if condition(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"/health did not show {what} within {timeout} s: {report}")
        await asyncio.sleep(0.02)


def in_flight(report: dict[str, Any]) -> list[int]:
    return [r["in_flight"] for r in report["replicas"]]


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_started_requests_and_is_probed_back_in(tmp_path: Path, monkeypatch):
    prepare_repository()
    # one request decoded at a time per server; one ONNX Runtime thread, not spinning: two servers share the cores
    repository = repository_with(tmp_path / "repository", max_live="1", runtime_threads="1", runtime_spin="false")
    servers = [TritonServer(repository, tmp_path / f"server{i}.log") for i in range(2)]
    gateway: Gateway | None = None
    try:
        for server in servers:
            server.wait_ready()
        gateway = Gateway(",".join(s.grpc_url for s in servers), tmp_path / "gateway.log").wait_ready()
        figures = asyncio.run(scenario(gateway, servers, repository, tmp_path, monkeypatch))
        print("failover:", json.dumps(figures))
    except BaseException:
        if gateway is not None:
            print(f"gateway log:\n{gateway.log_path.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        if gateway is not None:
            gateway.stop()
        for server in servers:
            server.kill()


async def scenario(gateway: Gateway, servers: list[TritonServer], repository: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    victim, survivor = servers[0].grpc_url, servers[1].grpc_url
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        report = await health(client)
        assert report["status"] == 200 and report["healthy"] == 2, report
        assert sorted(r["address"] for r in report["replicas"]) == sorted([victim, survivor])

        # one endless stream per replica (least-loaded choice), each past its first chunk
        live: list[Outcome] = []
        tasks: list[asyncio.Task] = []
        for _ in range(2):
            started = asyncio.Event()
            live.append(Outcome(ENDLESS_PROMPT, stream=True))
            tasks.append(asyncio.create_task(complete(client, live[-1], LONG_TOKENS, started)))
            await asyncio.wait_for(started.wait(), 60)
        report = await health(client)
        assert in_flight(report) == [1, 1], report

        # queued behind them: no byte of an answer yet (a stream's headers wait for its first block)
        queued = [Outcome(PROBLEMS[i % len(PROBLEMS)].prompt, stream=i % 2 == 0) for i in range(QUEUED)]
        for i, out in enumerate(queued):
            tasks.append(asyncio.create_task(complete(client, out)))
            expected = 2 + i + 1
            await until(client, lambda r: sum(in_flight(r)) == expected, f"{expected} requests in flight")
        before = await health(client)
        assert in_flight(before) == [1 + QUEUED // 2] * 2, before
        assert all(out.status is None for out in queued), [vars(out) for out in queued]
        assert all(not out.finish_reason for out in live), "an endless stream ended before the kill"

        # the kill: SIGKILL to the first server's process group, then more requests at once
        killed = time.monotonic()
        servers[0].kill()
        after = [Outcome(PROBLEMS[i % len(PROBLEMS)].prompt, stream=i % 2 == 1) for i in range(AFTER)]
        tasks += [asyncio.create_task(complete(client, out)) for out in after]
        ejected = await until(client, lambda r: replica(r, victim)["state"] != "healthy", "the replica ejected")
        ejected_after = time.monotonic() - killed
        await asyncio.gather(*tasks)
        settled = time.monotonic() - killed

        # the endless stream on the killed replica failed, with a clear error; the other finished whole
        failed = [out for out in live if not out.ok]
        assert len(failed) == 1, [vars(out) for out in live]
        lost, whole = failed[0], next(out for out in live if out.ok)
        assert lost.status == 200 and lost.chunks >= 1 and lost.finish_reason is None, vars(lost)
        assert lost.error is not None and lost.error["type"] == "server_error", vars(lost)
        assert victim in lost.error["message"] and lost.events[-1] == "[DONE]", lost.error
        assert whole.finish_reason == "length" and whole.usage is not None, vars(whole)
        assert whole.usage["completion_tokens"] == LONG_TOKENS
        # every request that had received nothing succeeded, with the right answer
        for out in queued + after:
            assert out.ok, vars(out)
            assert out.text == next(p.answer for p in PROBLEMS if p.prompt == out.prompt), vars(out)

        # /health and /metrics show the loss
        report = await health(client)
        assert report["status"] == 200 and report["ready"] and report["healthy"] == 1, report
        dead, alive = replica(report, victim), replica(report, survivor)
        assert dead["state"] in ("ejected", "probing") and dead["ejections"] == 1, dead
        assert dead["errors"]["replica"] >= 1 + QUEUED // 2 and dead["in_flight"] == 0, dead
        assert alive["state"] == "healthy" and alive["errors"] == {"replica": 0, "busy": 0, "request": 0}, alive
        assert report["retries"] >= QUEUED // 2, report
        metrics = (await client.get("/metrics")).text
        assert f'dlm_gateway_replica_healthy{{replica="{victim}"}} 0' in metrics
        assert f'dlm_gateway_replica_healthy{{replica="{survivor}"}} 1' in metrics
        assert f'dlm_gateway_replica_ejections_total{{replica="{victim}"}} 1' in metrics
        assert f'dlm_gateway_retries_total {report["retries"]}' in metrics

        # a server on the same ports: probed back in, and it takes requests again
        ports = iter([servers[0].http_port, servers[0].grpc_port, servers[0].metrics_port])
        with monkeypatch.context() as patch:
            patch.setattr(triton_server, "free_port", lambda: next(ports))
            revived = TritonServer(repository, tmp_path / "server0-restarted.log")
        servers.append(revived)
        assert revived.grpc_url == victim
        await asyncio.to_thread(revived.wait_ready)
        ready = time.monotonic()
        report = await until(client, lambda r: r["healthy"] == 2, "the restarted replica back in")
        back_after = time.monotonic() - ready
        requests_before = replica(report, victim)["requests"]
        again = [Outcome(PROBLEMS[i].prompt, stream=i % 2 == 0) for i in range(4)]
        await asyncio.gather(*(complete(client, out) for out in again))
        assert all(out.ok for out in again), [vars(out) for out in again]
        report = await health(client)
        assert replica(report, victim)["requests"] > requests_before, report
        assert replica(report, victim)["state"] == "healthy" and report["healthy"] == 2, report

    return {"requests": 2 + QUEUED + AFTER + len(again), "failed": 1, "in_flight_on_killed_replica": 1,
            "queued_on_killed_replica": QUEUED // 2, "retries": report["retries"],
            "ejected_after_s": round(ejected_after, 3), "all_settled_after_s": round(settled, 2),
            "back_in_after_ready_s": round(back_after, 2), "error": lost.error["message"][:300],
            "ejected_report": replica(ejected, victim)}
