"""client/replicas.py: the gateway's pool of Triton replicas.

Unit tests drive the pool over fake replicas (a scripted client per address, the real `AsyncBlockStream` and
`Accumulator` over their responses) and a fake resolver, with the background task's intervals long so every
resolution, probe and check happens when the test calls it. Two tests use real gRPC: a refused connection is
classified as the replica's failure, and a pool over the session's real tritonserver and a dead address serves
every request.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pytest

from client.grpc_client import AsyncBlockStream, AsyncGrpcClient
from client.replicas import (
    BUSY, EJECTED, HEALTHY, REPLICA, REQUEST, ReplicaPool, Target, cause, parse_targets, resolve,
)
from client.result import Accumulator, Cancelled, DLMError, InvalidRequest, Result, ServerUnavailable, Timeout

REFUSED = ServerUnavailable("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:8001: "
                            "Failed to connect to remote host: Connection refused", "StatusCode.UNAVAILABLE")
DROPPED = DLMError("the server closed the stream before the request's final response")


@dataclass
class Server:
    """What one fake replica does."""

    up: bool = True  # down: every request and probe fails to connect
    ready: bool = True  # what is_ready answers while up
    error: DLMError | None = None  # raised by a request before any response (or after `fail_after` blocks)
    fail_after: int | None = None
    blocks: tuple[str, ...] = ("ab", "cd")
    gate: asyncio.Event | None = None  # requests wait here (held in flight) once they have started
    probe_delay: float = 0.0
    requests: int = 0
    prompts: list[str] = field(default_factory=list)


class World:
    def __init__(self, *addresses: str):
        self.servers = {a: Server() for a in addresses}
        self.clients: list[FakeClient] = []

    def factory(self, url: str, model: str, timeout: float | None) -> "FakeClient":
        client = FakeClient(self, url)
        self.clients.append(client)
        return client


class FakeClient:
    """The part of `AsyncGrpcClient` the pool uses."""

    def __init__(self, world: World, address: str):
        self.world, self.address, self.closed = world, address, False

    @property
    def server(self) -> Server:
        return self.world.servers[self.address]

    async def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> Result:
        return await self.generate_stream(prompt, timeout=timeout, **options).drain()

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **options: Any) -> AsyncBlockStream:
        assert not self.closed, f"a request on a closed client of {self.address}"
        return AsyncBlockStream(self._responses(prompt), Accumulator())

    async def _responses(self, prompt: str) -> AsyncGenerator[tuple, None]:
        server = self.server
        server.requests += 1
        server.prompts.append(prompt)
        if not server.up:
            raise REFUSED
        if server.error is not None and server.fail_after is None:
            raise server.error
        for i, text in enumerate(server.blocks):
            if server.fail_after == i:
                raise server.error or DROPPED
            yield text, i + 2, 2 * (i + 1), False, "", None
            if server.gate is not None:
                await server.gate.wait()
            if not server.up:
                raise DROPPED
        yield "", len(server.blocks) + 1, 2 * len(server.blocks), True, "stop", None

    async def is_ready(self) -> bool:
        await asyncio.sleep(self.server.probe_delay)
        return self.server.up and self.server.ready

    async def close(self) -> None:
        self.closed = True


def pool_of(world: World, spec: str, dns: dict[str, list[str]] | None = None, **settings: Any) -> ReplicaPool:
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        if dns is None or host not in dns:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(dns[host])

    settings = {"resolve_interval": 3600, "probe_interval": 3600, "check_interval": 3600, **settings}
    pool = ReplicaPool(spec, client_factory=world.factory, resolver=resolver, **settings)
    pool.resolver_calls = calls  # type: ignore[attr-defined]
    return pool


def states(pool: ReplicaPool) -> dict[str, str]:
    return {r.address: r.state for r in pool.replicas.values()}


A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


# --- targets and resolution ----------------------------------------------------------------------------------------
def test_parse_targets():
    assert parse_targets("a:1, b:2") == [Target("a", 1), Target("b", 2)]
    (svc,) = parse_targets("dns:///dlm-triton.serving.svc.cluster.local:8001")
    assert svc == Target("dlm-triton.serving.svc.cluster.local", 8001) and not svc.is_address
    (v6,) = parse_targets("grpc://[::1]:9001")
    assert v6 == Target("::1", 9001) and v6.is_address and str(v6) == "[::1]:9001"
    assert parse_targets("triton") == [Target("triton", 8001)]
    assert parse_targets(["10.0.0.1:8001"])[0].is_address
    for bad in ("", "a:b", "a:0", "http://x/y", "a:1,,b:2", "a:99999"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_localhost_resolves_to_one_replica():
    assert asyncio.run(resolve("localhost", 8001)) == ["127.0.0.1"]


def test_a_name_takes_its_ipv4_addresses_when_it_has_both():
    both = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::2", 8001, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 8001)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 8001)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 8001))]
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::2", 8001, 0, 0))]

    async def main() -> tuple[list[str], list[str]]:
        loop = asyncio.get_running_loop()

        async def fake(host: str, port: int, **kwargs: Any) -> list:
            return both if host == "dual" else v6

        loop.getaddrinfo = fake  # type: ignore[method-assign, assignment]
        return await resolve("dual", 8001), await resolve("six", 8001)

    assert asyncio.run(main()) == (["10.0.0.1", "10.0.0.2"], ["fd00::2"])


def test_a_name_gives_every_address_and_an_ip_stays_one_replica():
    world = World(A, B, "10.0.0.9:8001")

    async def main() -> None:
        pool = pool_of(world, "svc:8001,10.0.0.9:8001", dns={"svc": ["10.0.0.2", "10.0.0.1"]})
        await pool.start()
        try:
            assert states(pool) == {A: HEALTHY, B: HEALTHY, "10.0.0.9:8001": HEALTHY}
            assert pool.resolver_calls == ["svc"]  # type: ignore[attr-defined]
            assert {r.source for r in pool.replicas.values()} == {"svc:8001", "10.0.0.9:8001"}
        finally:
            await pool.close()
        assert all(c.closed for c in world.clients)

    asyncio.run(main())


def test_the_pool_follows_dns_and_drains_a_vanished_replica():
    world = World(A, B, C)
    dns = {"svc": ["10.0.0.1", "10.0.0.2"]}

    async def main() -> None:
        pool = pool_of(world, "svc:8001", dns=dns)
        await pool.start()
        for s in world.servers.values():
            s.gate = asyncio.Event()
        held = [asyncio.create_task(pool.generate(f"p{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        assert {r.address: r.in_flight for r in pool.replicas.values()} == {A: 1, B: 1}
        old_a_client = pool.replicas[A].client

        dns["svc"] = ["10.0.0.2", "10.0.0.3"]
        await pool.refresh()
        assert states(pool) == {A: "retired", B: HEALTHY, C: HEALTHY}  # A still runs its request
        assert not old_a_client.closed
        for _ in range(4):
            assert pool.pick().address in (B, C)

        for s in world.servers.values():
            s.gate.set()  # type: ignore[union-attr]
        results = await asyncio.gather(*held)
        assert [r.text for r in results] == ["abcd", "abcd"]
        await pool.refresh()
        assert states(pool) == {B: HEALTHY, C: HEALTHY} and old_a_client.closed

        # a failed resolution keeps what is known
        del dns["svc"]
        await pool.refresh()
        assert states(pool) == {B: HEALTHY, C: HEALTHY}
        assert "svc" in pool.status()["resolve_errors"]
        await pool.close()

    asyncio.run(main())


def test_an_unresolvable_name_leaves_the_pool_empty_and_says_why_until_it_resolves():
    dns: dict[str, list[str]] = {}

    async def main() -> None:
        pool = pool_of(World(A), "svc:8001", dns=dns, probe_interval=0.02)  # resolve_interval stays an hour
        await pool.start()
        assert not await pool.is_ready() and pool.status()["ready"] is False
        with pytest.raises(ServerUnavailable, match="no Triton replica at svc:8001.*not known"):
            await pool.generate("x")
        dns["svc"] = ["10.0.0.1"]  # the first pod became ready: an empty pool resolves at every round
        for _ in range(100):
            await asyncio.sleep(0.02)
            if await pool.is_ready():
                break
        assert states(pool) == {A: HEALTHY} and "resolve_errors" not in pool.status()
        assert (await pool.generate("x")).text == "abcd"
        await pool.close()

    asyncio.run(main())


# --- choosing a replica --------------------------------------------------------------------------------------------
def test_least_loaded_then_round_robin():
    world = World(A, B, C)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B},{C}")
        await pool.start()
        pool.replicas[A].in_flight, pool.replicas[B].in_flight, pool.replicas[C].in_flight = 2, 0, 1
        assert {pool.pick().address for _ in range(6)} == {B}
        for r in pool.replicas.values():
            r.in_flight = 0
        picks = [pool.pick().address for _ in range(30)]
        assert {a: picks.count(a) for a in (A, B, C)} == {A: 10, B: 10, C: 10}

        # held requests spread evenly: each new one goes where the fewest are in flight
        for s in world.servers.values():
            s.gate = asyncio.Event()
        held = [asyncio.create_task(pool.generate(f"p{i}")) for i in range(6)]
        await asyncio.sleep(0.05)
        assert {r.address: r.in_flight for r in pool.replicas.values()} == {A: 2, B: 2, C: 2}
        for s in world.servers.values():
            s.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*held)
        assert all(r.in_flight == 0 and r.requests == 2 for r in pool.replicas.values())
        await pool.close()

    asyncio.run(main())


# --- failures ------------------------------------------------------------------------------------------------------
def test_cause():
    assert cause(REFUSED) == REPLICA and cause(DROPPED) == REPLICA
    assert cause(ServerUnavailable("the server is shutting down")) == REPLICA
    assert cause(ServerUnavailable("the queue is full (64 requests waiting); retry later")) == BUSY
    assert cause(ServerUnavailable("x", "StatusCode.RESOURCE_EXHAUSTED")) == BUSY
    assert cause(InvalidRequest("threshold must be in (0, 1], got 1.5")) == REQUEST
    assert cause(Timeout("no response within 1 s")) == REQUEST
    assert cause(Cancelled("cancelled")) == REQUEST
    assert cause(DLMError("the model raised: out of memory", "StatusCode.INTERNAL")) == REQUEST
    assert cause(ValueError("not ours")) == REQUEST


def test_a_unary_request_that_fails_before_its_first_byte_moves_once_and_the_replica_is_ejected():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        world.servers[A].up = False  # A died after it was probed in
        results = [await pool.generate(f"p{i}") for i in range(4)]
        assert [r.text for r in results] == ["abcd"] * 4
        a, b = pool.replicas[A], pool.replicas[B]
        assert a.state == EJECTED and "Connection refused" in a.last_error
        assert (a.requests, a.errors[REPLICA], a.ejections) == (1, 1, 1)
        assert b.requests == 4 and sum(b.errors.values()) == 0 and pool.retries == 1
        assert world.servers[A].requests == 1  # after the ejection nothing more went to A
        await pool.close()

    asyncio.run(main())


def test_a_request_is_retried_only_once():
    world = World(A, B, C)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B},{C}")
        await pool.start()
        pool.replicas[C].in_flight = 5  # C is chosen last
        world.servers[A].up = world.servers[B].up = False
        with pytest.raises(ServerUnavailable, match="Connection refused") as raised:
            await pool.generate("x")
        assert re.match(rf"Triton replica ({A}|{B}) failed and the request had already been moved once: failed to "
                        "connect", str(raised.value))
        assert world.servers[C].requests == 0 and pool.retries == 1
        assert states(pool) == {A: EJECTED, B: EJECTED, C: HEALTHY}
        await pool.close()

    asyncio.run(main())


def test_a_replica_error_that_reaches_the_caller_names_the_replica_and_why_it_was_not_moved():
    world = World(A)

    async def main() -> None:
        pool = pool_of(world, A)
        await pool.start()
        world.servers[A].error = ServerUnavailable("the queue is full (64 requests waiting); retry later")
        with pytest.raises(ServerUnavailable) as raised:
            await pool.generate("x")
        assert str(raised.value) == (f"Triton replica {A} refused the request for load and no other healthy replica "
                                     "was left to move the request to: the queue is full (64 requests waiting); "
                                     "retry later")
        assert cause(raised.value) == BUSY and pool.replicas[A].state == HEALTHY
        world.servers[A].error, world.servers[A].up = None, False
        with pytest.raises(ServerUnavailable) as raised:
            await pool.generate_stream("x").drain()
        assert str(raised.value) == (f"Triton replica {A} failed and no other healthy replica was left to move the "
                                     f"request to: {REFUSED}")
        assert cause(raised.value) == REPLICA and raised.value.status == REFUSED.status
        await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("error", [InvalidRequest("max_tokens must be in [1, 991], got 5000"),
                                   Timeout("no response within 2 s")])
def test_the_requests_own_errors_are_neither_retried_nor_ejecting(error):
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        world.servers[A].error = world.servers[B].error = error
        with pytest.raises(type(error)) as raised:
            await pool.generate("x")
        assert raised.value is error  # the server's message, unchanged
        assert pool.retries == 0 and states(pool) == {A: HEALTHY, B: HEALTHY}
        assert sum(r.errors[REQUEST] for r in pool.replicas.values()) == 1
        assert sum(world.servers[x].requests for x in (A, B)) == 1
        await pool.close()

    asyncio.run(main())


def test_a_busy_replica_is_passed_over_but_kept():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        world.servers[A].error = ServerUnavailable("the queue is full (64 requests waiting); retry later")
        results = [await pool.generate(f"p{i}") for i in range(2)]
        assert [r.text for r in results] == ["abcd", "abcd"]
        a = pool.replicas[A]
        assert a.state == HEALTHY and a.errors[BUSY] == 1 and a.ejections == 0 and pool.retries == 1
        await pool.close()

    asyncio.run(main())


def test_a_stream_moves_before_its_first_block():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        pool.replicas[B].in_flight = 1  # A is chosen first
        world.servers[A].up = False
        stream = pool.generate_stream("upper:abc=")
        async with stream:
            texts = [block.text async for block in stream]
        assert texts == ["ab", "cd"] and stream.result.text == "abcd"
        assert stream.replica is None  # released at its end
        assert pool.replicas[A].state == EJECTED and pool.retries == 1
        pool.replicas[B].in_flight -= 1
        assert all(r.in_flight == 0 for r in pool.replicas.values())
        await pool.close()

    asyncio.run(main())


def test_a_stream_that_fails_after_its_first_block_fails_and_ejects():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        pool.replicas[B].in_flight = 1
        world.servers[A].fail_after = 1  # the server drops the stream after one block
        stream = pool.generate_stream("x")
        first = await stream.__anext__()
        assert first.text == "ab" and stream.replica == A
        with pytest.raises(DLMError, match="closed the stream") as raised:
            await stream.__anext__()
        assert str(raised.value) == (f"Triton replica {A} failed after 1 block of the answer had been sent, so it was "
                                     f"not retried: {DROPPED}")
        await stream.aclose()
        assert world.servers[B].requests == 0 and pool.retries == 0  # the caller already had a block
        assert pool.replicas[A].state == EJECTED and pool.replicas[A].in_flight == 0
        await pool.close()

    asyncio.run(main())


def test_requests_in_flight_are_uncounted_however_they_end():
    world = World(A)

    async def main() -> None:
        pool = pool_of(world, A)
        await pool.start()
        a = pool.replicas[A]
        await pool.generate("ok")
        world.servers[A].error = InvalidRequest("bad")
        with pytest.raises(InvalidRequest):
            await pool.generate("bad")
        world.servers[A].error = None
        stream = pool.generate_stream("closed early")
        await stream.__anext__()
        assert a.in_flight == 1
        await stream.aclose()
        assert a.in_flight == 0
        world.servers[A].gate = asyncio.Event()
        task = asyncio.create_task(pool.generate("cancelled"))
        await asyncio.sleep(0.05)
        assert a.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.in_flight == 0 and a.requests == 4 and a.state == HEALTHY
        await pool.close()

    asyncio.run(main())


# --- recovery ------------------------------------------------------------------------------------------------------
def test_an_ejected_replica_is_probed_back_in_with_a_fresh_client():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        first_client = pool.replicas[A].client
        world.servers[A].up = False
        pool.eject(pool.replicas[A], REFUSED)
        await pool.probe()
        assert pool.replicas[A].state == EJECTED and pool.replicas[A].last_error.startswith("probe:")
        world.servers[A].up = True
        await pool.probe()
        a = pool.replicas[A]
        assert a.state == HEALTHY and a.last_error == "" and a.client is not first_client
        await pool.refresh()  # sweeps the replaced client
        assert first_client.closed and not a.client.closed
        assert pool.status()["healthy"] == 2
        await pool.close()

    asyncio.run(main())


def test_a_replica_that_is_not_ready_at_start_joins_when_it_is():
    world = World(A, B)
    world.servers[B].ready = False  # still loading its engine

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        assert states(pool) == {A: HEALTHY, B: EJECTED} and pool.replicas[B].ejections == 0
        world.servers[B].ready = True
        await pool.probe()
        assert states(pool) == {A: HEALTHY, B: HEALTHY}
        await pool.close()

    asyncio.run(main())


def test_health_checks_eject_an_unready_replica_but_not_a_slow_one():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}", probe_timeout=0.1)
        await pool.start()
        world.servers[A].ready = False
        world.servers[B].probe_delay = 0.5
        await pool.check()
        assert states(pool) == {A: EJECTED, B: HEALTHY}
        assert "health check" in pool.replicas[A].last_error
        await pool.close()

    asyncio.run(main())


def test_the_background_task_probes_and_resolves():
    world = World(A, B)
    dns = {"svc": ["10.0.0.1"]}

    async def main() -> None:
        pool = pool_of(world, "svc:8001", dns=dns, probe_interval=0.02, resolve_interval=0.05, check_interval=0.05)
        await pool.start()
        world.servers[A].up = False
        with pytest.raises(ServerUnavailable):
            await pool.generate("x")  # no other replica to move to
        assert states(pool) == {A: EJECTED}
        dns["svc"] = ["10.0.0.1", "10.0.0.2"]
        world.servers[A].up = True
        for _ in range(100):
            await asyncio.sleep(0.02)
            if states(pool) == {A: HEALTHY, B: HEALTHY}:
                break
        assert states(pool) == {A: HEALTHY, B: HEALTHY}
        await pool.close()

    asyncio.run(main())


# --- reports -------------------------------------------------------------------------------------------------------
def test_status_and_metrics():
    world = World(A, B)

    async def main() -> None:
        pool = pool_of(world, f"{A},{B}")
        await pool.start()
        pool.replicas[B].in_flight = 1
        world.servers[A].up = False
        await pool.generate("x")  # A fails, moves to B
        pool.replicas[B].in_flight -= 1
        status = pool.status()
        assert status["ready"] is True and status["healthy"] == 1 and status["retries"] == 1
        by_address = {r["address"]: r for r in status["replicas"]}
        assert by_address[A]["state"] == EJECTED and by_address[A]["errors"][REPLICA] == 1
        assert by_address[B]["state"] == HEALTHY and by_address[B]["requests"] == 1
        text = pool.metrics_text()
        sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \d+$')
        for line in text.splitlines():
            assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
        assert f'dlm_gateway_replica_requests_total{{replica="{A}"}} 1' in text
        assert f'dlm_gateway_replica_errors_total{{replica="{A}",cause="replica"}} 1' in text
        assert f'dlm_gateway_replica_healthy{{replica="{A}"}} 0' in text
        assert f'dlm_gateway_replica_healthy{{replica="{B}"}} 1' in text
        assert "dlm_gateway_retries_total 1" in text
        await pool.close()

    asyncio.run(main())


# --- real gRPC -----------------------------------------------------------------------------------------------------
def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_a_refused_grpc_connection_is_the_replicas_failure():
    async def main() -> None:
        client = AsyncGrpcClient(dead_address(), "dlm")
        try:
            with pytest.raises(DLMError) as refused:
                await client.generate("x")
            assert cause(refused.value) == REPLICA
            stream = client.generate_stream("x")
            with pytest.raises(DLMError) as refused_stream:
                await stream.__anext__()
            assert cause(refused_stream.value) == REPLICA
        finally:
            await client.close()

    asyncio.run(main())


def test_a_pool_over_a_real_triton_and_a_dead_replica(triton):
    dead = dead_address()

    async def main() -> None:
        pool = ReplicaPool(f"{dead},{triton.grpc_url}", "dlm", resolve_interval=3600, probe_interval=3600,
                           check_interval=3600)
        await pool.start()
        try:
            assert states(pool) == {dead: EJECTED, triton.grpc_url: HEALTHY}  # its probe failed
            # as if it had died after its probe: healthy, with a client, nothing listening
            replica = pool.replicas[dead]
            replica.state, replica.client = HEALTHY, AsyncGrpcClient(dead, "dlm")
            unary = [pool.generate("4821+377=", mode="ar", max_tokens=8) for _ in range(3)]

            async def streamed() -> str:
                async with pool.generate_stream("4821+377=", mode="ar", max_tokens=8) as stream:
                    return "".join([block.text async for block in stream])

            results = await asyncio.gather(*unary)
            texts = await asyncio.gather(streamed(), streamed())
            direct = AsyncGrpcClient(triton.grpc_url, "dlm")
            expected = (await direct.generate("4821+377=", mode="ar", max_tokens=8)).text
            await direct.close()
            assert expected and [r.text for r in results] == [expected] * 3 and texts == [expected] * 2
            assert pool.replicas[dead].state == EJECTED and pool.replicas[dead].errors[REPLICA] >= 1
            assert pool.retries >= 1 and pool.replicas[triton.grpc_url].requests == 5
            await pool.probe()
            assert pool.replicas[dead].state == EJECTED  # still nothing there
            assert all(r.in_flight == 0 for r in pool.replicas.values())
        finally:
            await pool.close()

    asyncio.run(main())
