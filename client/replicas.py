"""Several Triton replicas behind one client: the gateway's `--triton` over a Kubernetes headless Service or a list.

    pool = ReplicaPool.from_spec("dlm-triton.serving.svc.cluster.local:8001", model="dlm")
    await pool.start()                       # inside the event loop that uses it
    result = await pool.generate("4821+377=", mode="ar")
    async with pool.generate_stream("upper:abc=") as stream:
        async for block in stream: ...
    pool.status(), pool.metrics_text()       # for /health and /metrics
    await pool.close()

`ReplicaPool` has the interface of `AsyncGrpcClient` (`generate`, `generate_stream`, `is_ready`, `close`), so it
replaces one where a single address was used.

- **Targets.** A comma-separated list of `host:port` (the port defaults to Triton's gRPC 8001; `grpc://` and
  `dns:///` prefixes are accepted). An IP address is one replica. A name is resolved to all its addresses, every one
  a replica: a headless Service's name gives every ready pod. IPv4 addresses are taken when the name has any, IPv6
  otherwise (so `localhost` is one replica, not two, and a dual-stack Service does not count each pod twice). Names
  are resolved again every `resolve_interval` seconds: a new address joins once its probe succeeds, a vanished one
  takes no new requests and is closed when its last request ends. A failed resolution keeps the replicas known.
- **Choice.** Each request goes to the healthy replica with the fewest requests in flight from this pool; ties go
  round-robin. (Each gateway process sees only its own requests.)
- **Failures.** A request fails *before its first byte* when no response has reached the caller: a unary request
  that raised, a stream before its first block. If the cause is the replica (the connection failed, the server
  closed the stream, it is shutting down or not ready) the replica is ejected; if the replica refused for load
  (its queue is full) it stays in. In both cases the request is sent once more, to another healthy replica. An
  error of the request itself (a bad input, a timeout, a cancellation) is never retried. A replica that fails after
  the first byte is ejected too, and that request fails with its error (its caller already has part of the answer).
  An error of a replica's that reaches the caller names the replica and why the request was not moved ("Triton
  replica 10.0.0.1:8001 failed after 3 blocks of the answer had been sent, so it was not retried: Socket closed").
- **Recovery.** Every `probe_interval` seconds each ejected replica is probed with a fresh gRPC channel (an old one
  may sit in reconnect backoff for minutes): when Triton answers that the model is ready (`is_model_ready`, what
  `/v2/models/dlm/ready` reports; with Triton's default strict readiness `/v2/health/ready` agrees), it is back in.
  Healthy replicas are checked every `check_interval` seconds; a replica that answers "not ready" or cannot be
  reached is ejected without waiting for a request to fail on it (a probe that merely times out ejects nothing).
- **Counters.** Per replica: requests sent (retries included), errors by cause (`replica`, `busy`, `request`),
  ejections, requests in flight; and retries overall. `status()` reports them with each replica's state, and
  `metrics_text()` in Prometheus' text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.grpc_client import AsyncBlockStream, AsyncGrpcClient
from client.result import Block, Cancelled, DLMError, InvalidRequest, Result, ServerUnavailable, Timeout

log = logging.getLogger("client.replicas")

DEFAULT_PORT = 8001
HEALTHY, EJECTED, PROBING, RETIRED = "healthy", "ejected", "probing", "retired"
# what a failed request says about its replica
REPLICA, BUSY, REQUEST = "replica", "busy", "request"

_BUSY = re.compile(r"queue is full|retry later|resource.exhausted|too many", re.IGNORECASE)
_CLOSED = re.compile(r"closed the stream before|stream (was )?(reset|removed)|socket closed|connection reset",
                     re.IGNORECASE)

ClientFactory = Callable[[str, str, "float | None"], Any]
Resolver = Callable[[str, int], Awaitable[list[str]]]


def cause(error: BaseException) -> str:
    """`replica` when the error says the replica failed (eject it), `busy` when it refused for load (try another,
    keep it), `request` when the request itself is at fault or was stopped (neither)."""
    if not isinstance(error, DLMError) or isinstance(error, (InvalidRequest, Cancelled, Timeout)):
        return REQUEST
    status, message = str(error.status or ""), str(error)
    if status == "StatusCode.RESOURCE_EXHAUSTED" or (isinstance(error, ServerUnavailable) and _BUSY.search(message)):
        return BUSY
    if isinstance(error, ServerUnavailable) or _CLOSED.search(message):
        return REPLICA  # unreachable, shutting down, not ready, or a stream the server dropped
    return REQUEST


# --- targets -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One entry of the spec: a host (a name to resolve, or an IP address) and a port."""

    host: str
    port: int

    @property
    def is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False

    def __str__(self) -> str:
        return address(self.host, self.port)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(spec: str | Sequence[str]) -> list[Target]:
    """'a:8001,b:8001', 'dns:///svc.ns.svc.cluster.local:8001', 'grpc://[::1]:8001', 'host' (port 8001)."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    targets: list[Target] = []
    for raw in entries:
        entry = raw.strip()
        for prefix in ("dns:///", "dns://", "grpc://", "ipv4:", "ipv6:"):
            if entry.startswith(prefix):
                entry = entry[len(prefix):]
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else rest
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        else:
            host, port_text = entry, ""
        if not host or "/" in host or (port_text and not port_text.isdigit()):
            raise ValueError(f"not a Triton gRPC address (host:port, several separated by commas): {raw!r}")
        port = int(port_text) if port_text else DEFAULT_PORT
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {raw!r}")
        targets.append(Target(host, port))
    if not targets:
        raise ValueError("no Triton address given")
    return targets


async def resolve(host: str, port: int) -> list[str]:
    """All addresses of `host`: its IPv4 ones if it has any, else its IPv6 ones; sorted, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


# --- replicas ------------------------------------------------------------------------------------------------------
@dataclass
class Replica:
    """One Triton server: its address, client, state and counters."""

    address: str
    source: str  # the spec entry it came from
    client: Any
    state: str = HEALTHY
    in_flight: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {REPLICA: 0, BUSY: 0, REQUEST: 0})
    ejections: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)  # when it entered its state
    stale: list[Any] = field(default_factory=list)  # clients replaced after a probe, closed once idle

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "source": self.source, "state": self.state, "in_flight": self.in_flight,
                "requests": self.requests, "errors": dict(self.errors), "ejections": self.ejections,
                "last_error": self.last_error, "since": round(self.since, 3)}


class ReplicaPool:
    """Triton replicas behind the interface of `AsyncGrpcClient`; see the module's docstring. Create and `start()`
    it inside the event loop that uses it."""

    def __init__(self, targets: str | Sequence[str], model: str = "dlm", timeout: float | None = None, *,
                 resolve_interval: float = 10.0, probe_interval: float = 2.0, check_interval: float = 5.0,
                 probe_timeout: float = 2.0, client_factory: ClientFactory | None = None,
                 resolver: Resolver | None = None):
        self.spec = targets if isinstance(targets, str) else ",".join(targets)
        self.targets = parse_targets(targets)
        self.model, self.timeout = model, timeout
        self.resolve_interval, self.probe_interval = resolve_interval, probe_interval
        self.check_interval, self.probe_timeout = check_interval, probe_timeout
        self._factory: ClientFactory = client_factory or (lambda url, model, timeout: AsyncGrpcClient(url, model,
                                                                                                      timeout))
        self._resolver: Resolver = resolver or resolve
        self.replicas: dict[str, Replica] = {}
        self.retries = 0
        self.resolve_errors: dict[str, str] = {}
        self._turn = 0
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    def from_spec(cls, spec: str, model: str = "dlm", timeout: float | None = None, **settings: Any) -> "ReplicaPool":
        return cls(spec, model, timeout, **settings)

    @property
    def url(self) -> str:
        return self.spec

    # --- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> "ReplicaPool":
        """Resolve the targets, open a client per replica, and start resolving and probing in the background."""
        await self.refresh(initial=True)
        self._task = asyncio.create_task(self._maintain(), name="dlm-replica-pool")
        return self

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in list(self.replicas.values()):
            await self._close_clients(replica, everything=True)
        self.replicas.clear()

    async def __aenter__(self) -> "ReplicaPool":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- requests ----------------------------------------------------------------------------------------------
    async def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> Result:
        """One unary request, sent once more to another replica when it fails for a replica's reason."""
        tried: set[str] = set()
        while True:
            replica = self.pick(exclude=tried)
            tried.add(replica.address)
            with self.track(replica) as outcome:
                try:
                    return await replica.client.generate(prompt, timeout=timeout, **options)
                except DLMError as error:
                    outcome.append(error)
                    if not self._retry(error, tried):
                        named = self._named(error, replica, tried)
                        if named is error:
                            raise
                        raise named from error

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **options: Any) -> "PooledStream":
        """A stream of `Block`s (an `AsyncBlockStream`); before its first block it may move once to another
        replica."""
        return PooledStream(self, prompt, timeout, options)

    async def is_ready(self) -> bool:
        return any(r.state == HEALTHY for r in self.replicas.values())

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Replica:
        """The healthy replica with the fewest requests in flight (round-robin among equals)."""
        healthy = [r for r in self.replicas.values() if r.state == HEALTHY and r.address not in exclude]
        if not healthy:
            raise ServerUnavailable(self._none_message(exclude), "no replica")
        least = min(r.in_flight for r in healthy)
        candidates = sorted((r for r in healthy if r.in_flight == least), key=lambda r: r.address)
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    @contextlib.contextmanager
    def track(self, replica: Replica) -> Iterator[list[BaseException]]:
        """Count one request on `replica` while it runs; an error appended to the yielded list is recorded (and
        ejects the replica when it is the replica's fault)."""
        replica.in_flight += 1
        replica.requests += 1
        outcome: list[BaseException] = []
        try:
            yield outcome
        finally:
            replica.in_flight -= 1
            for error in outcome:
                self.record(replica, error)

    def record(self, replica: Replica, error: BaseException) -> str:
        kind = cause(error)
        if isinstance(error, Cancelled):
            return kind  # the caller stopped it: no error of anyone's
        replica.errors[kind] += 1
        if kind == REPLICA:
            self.eject(replica, error)
        return kind

    def eject(self, replica: Replica, error: BaseException | str) -> None:
        replica.last_error = str(error)
        if replica.state == HEALTHY:
            replica.state, replica.since = EJECTED, time.time()
            replica.ejections += 1
            log.warning("replica %s ejected: %s", replica.address, replica.last_error)

    def _retry(self, error: DLMError, tried: set[str]) -> bool:
        """Whether a request that failed before its first byte goes once more to another replica."""
        if len(tried) >= 2 or cause(error) == REQUEST or self._closed:
            return False
        if not any(r.state == HEALTHY and r.address not in tried for r in self.replicas.values()):
            return False
        self.retries += 1
        return True

    def _named(self, error: DLMError, replica: Replica, tried: set[str], blocks: int = 0) -> DLMError:
        """The error as its caller gets it: when the replica failed (or refused for load), a message that names
        the replica and says why the request was not moved; the request's own errors unchanged."""
        kind = cause(error)
        if kind == REQUEST:
            return error
        what = "failed" if kind == REPLICA else "refused the request for load"
        if blocks:
            why = f"after {blocks} block{'s' if blocks > 1 else ''} of the answer had been sent, so it was not retried"
        elif len(tried) >= 2:
            why = "and the request had already been moved once"
        else:
            why = "and no other healthy replica was left to move the request to"
        return type(error)(f"Triton replica {replica.address} {what} {why}: {error}", error.status)

    def _none_message(self, exclude: set[str] | frozenset[str]) -> str:
        if not self.replicas:
            problems = "; ".join(f"{host}: {why}" for host, why in self.resolve_errors.items())
            return f"no Triton replica at {self.spec}" + (f" ({problems})" if problems else "")
        states = ", ".join(f"{r.address} {r.state}" + (f" ({r.last_error})" if r.last_error else "")
                           for r in self.replicas.values())
        return f"no healthy Triton replica{' left to retry on' if exclude else ''}: {states}"

    # --- resolution and probes -----------------------------------------------------------------------------------
    async def refresh(self, initial: bool = False) -> None:
        """Resolve every target again; probe new addresses in, retire vanished ones."""
        wanted: dict[str, str] = {}
        resolved_all = True
        for target in self.targets:
            if target.is_address:
                wanted[str(target)] = str(target)
                continue
            try:
                hosts = await self._resolver(target.host, target.port)
            except (OSError, UnicodeError) as error:
                resolved_all = False
                self.resolve_errors[target.host] = str(error) or type(error).__name__
                log.warning("cannot resolve %s: %s (keeping the replicas known)", target.host, error)
                continue
            self.resolve_errors.pop(target.host, None)
            for host in hosts:
                wanted.setdefault(address(host, target.port), str(target))
        for key, source in wanted.items():
            replica = self.replicas.get(key)
            if replica is None:
                replica = Replica(key, source, None, state=PROBING)
                self.replicas[key] = replica
                log.info("replica %s found (from %s)", key, source)
            elif replica.state == RETIRED:
                replica.state, replica.since = EJECTED, time.time()  # back in DNS: probed before it takes requests
        if resolved_all:
            for key, replica in self.replicas.items():
                if key not in wanted and replica.state != RETIRED:
                    replica.state, replica.since = RETIRED, time.time()
                    log.info("replica %s is gone from %s", key, replica.source)
        await self.probe(states=(PROBING, EJECTED) if not initial else (PROBING,))
        await self._sweep()

    async def probe(self, states: Sequence[str] = (EJECTED, PROBING)) -> None:
        """Probe the replicas in `states` with fresh clients; those whose model is ready are back in."""
        await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values()) if r.state in states))

    async def _probe(self, replica: Replica) -> None:
        client = self._factory(replica.address, self.model, self.timeout)
        try:
            ready = await asyncio.wait_for(client.is_ready(), self.probe_timeout)
            why = "" if ready else "the model is not ready"
        except Exception as error:  # unreachable or timed out: stays out
            ready, why = False, str(error) or type(error).__name__
        if not ready or replica.state not in (EJECTED, PROBING):
            await _close(client)
            if not ready:
                replica.last_error = f"probe: {why}"
                if replica.state == PROBING:  # found but not ready: probed again like an ejected one
                    replica.state, replica.since = EJECTED, time.time()
            return
        if replica.client is not None:
            replica.stale.append(replica.client)  # closed once its requests are over
        replica.client = client
        if replica.state == EJECTED:
            log.info("replica %s is back", replica.address)
        replica.state, replica.since, replica.last_error = HEALTHY, time.time(), ""

    async def check(self) -> None:
        """Ask each healthy replica whether its model is ready; eject those that say no or cannot be reached."""
        async def one(replica: Replica) -> None:
            try:
                ready = await asyncio.wait_for(replica.client.is_ready(), self.probe_timeout)
            except (asyncio.TimeoutError, TimeoutError):
                return  # slow is not dead
            except Exception as error:
                ready, replica.last_error = False, str(error) or type(error).__name__
            else:
                replica.last_error = "" if ready else replica.last_error
            if not ready and replica.state == HEALTHY:
                self.eject(replica, f"health check: {replica.last_error or 'the model is not ready'}")

        await asyncio.gather(*(one(r) for r in list(self.replicas.values()) if r.state == HEALTHY))

    async def _maintain(self) -> None:
        now = time.monotonic()
        next_resolve, next_check = now + self.resolve_interval, now + self.check_interval
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                now = time.monotonic()
                # no replica known yet (the name did not resolve at start): resolve at every round until one is
                if (now >= next_resolve or not self.replicas) and any(not t.is_address for t in self.targets):
                    next_resolve = now + self.resolve_interval
                    await self.refresh()
                else:
                    await self.probe()
                if now >= next_check:
                    next_check = now + self.check_interval
                    await self.check()
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the pool must outlive any one bad round
                log.exception("replica pool maintenance failed; trying again")

    async def _sweep(self) -> None:
        """Close what is no longer used: retired replicas and replaced clients, once nothing runs on them."""
        for key, replica in list(self.replicas.items()):
            if replica.in_flight:
                continue
            await self._close_clients(replica, everything=replica.state == RETIRED)
            if replica.state == RETIRED:
                del self.replicas[key]

    async def _close_clients(self, replica: Replica, everything: bool) -> None:
        stale, replica.stale = replica.stale, []
        if everything and replica.client is not None:
            stale.append(replica.client)
            replica.client = None
        for client in stale:
            await _close(client)

    # --- reports -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /health: ready when any replica is healthy; every replica with its state and counters."""
        replicas = [r.to_dict() for r in sorted(self.replicas.values(), key=lambda r: r.address)]
        healthy = sum(r["state"] == HEALTHY for r in replicas)
        out: dict[str, Any] = {"ready": healthy > 0, "healthy": healthy, "replicas": replicas,
                               "retries": self.retries, "targets": self.spec}
        if self.resolve_errors:
            out["resolve_errors"] = dict(self.resolve_errors)
        return out

    def metrics_text(self) -> str:
        """The counters in Prometheus' text exposition format (for a /metrics endpoint)."""
        Samples = Callable[[Replica], list[tuple[dict[str, str], int]]]
        families: list[tuple[str, str, str, Samples]] = [
            ("dlm_gateway_replica_requests_total", "counter",
             "Requests sent to each Triton replica (retries included)", lambda r: [({}, r.requests)]),
            ("dlm_gateway_replica_errors_total", "counter",
             "Requests that failed on each replica, by cause: replica (it failed and was ejected), busy (it "
             "refused for load), request (the request's own error)",
             lambda r: [({"cause": k}, v) for k, v in sorted(r.errors.items())]),
            ("dlm_gateway_replica_ejections_total", "counter", "Times each replica was ejected",
             lambda r: [({}, r.ejections)]),
            ("dlm_gateway_replica_in_flight", "gauge", "Requests in flight on each replica",
             lambda r: [({}, r.in_flight)]),
            ("dlm_gateway_replica_healthy", "gauge", "1 while the replica takes requests, else 0",
             lambda r: [({}, int(r.state == HEALTHY))]),
        ]
        lines: list[str] = []
        replicas = sorted(self.replicas.values(), key=lambda r: r.address)
        for name, kind, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for replica in replicas:
                for labels, value in samples(replica):
                    pairs = {"replica": replica.address, **labels}
                    rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
                    lines.append(f"{name}{{{rendered}}} {value}")
        lines += ["# HELP dlm_gateway_retries_total Requests sent once more to another replica",
                  "# TYPE dlm_gateway_retries_total counter", f"dlm_gateway_retries_total {self.retries}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def _close(client: Any) -> None:
    try:
        await client.close()
    except Exception:  # closing a broken channel must not break the pool
        log.debug("closing a replica client failed", exc_info=True)


class PooledStream(AsyncBlockStream):
    """A streamed request on a `ReplicaPool`: opened on the least-loaded healthy replica at its first `__anext__`,
    moved once to another replica if that one fails before the first block; then bound to it. Same interface as
    `AsyncBlockStream` (`async for`, `result`, `aclose`, `drain`, `async with`)."""

    def __init__(self, pool: ReplicaPool, prompt: str, timeout: float | None, options: dict[str, Any]):
        self._pool, self._prompt, self._timeout, self._options = pool, prompt, timeout, options
        self._inner: AsyncBlockStream | None = None
        self._replica: Replica | None = None
        self._tried: set[str] = set()
        self._blocks = 0  # delivered to the caller
        self._done = False

    @property
    def replica(self) -> str | None:
        """The address of the replica serving it (None before it has been opened)."""
        return self._replica.address if self._replica else None

    async def __anext__(self) -> Block:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._inner is None:
                self._open()
            assert self._inner is not None and self._replica is not None
            try:
                block = await self._inner.__anext__()
            except StopAsyncIteration:
                self._release()
                raise
            except DLMError as error:
                replica = self._replica
                await self._inner.aclose()
                self._release(error)
                if self._blocks or not self._pool._retry(error, self._tried):
                    self._done = True
                    named = self._pool._named(error, replica, self._tried, self._blocks)
                    if named is error:
                        raise
                    raise named from error
                log.info("request moves from %s to another replica: %s", replica.address, error)
                self._inner = None
                continue
            self._blocks += 1
            return block

    def _open(self) -> None:
        replica = self._pool.pick(exclude=self._tried)
        self._tried.add(replica.address)
        replica.in_flight += 1
        replica.requests += 1
        self._replica = replica
        self._inner = replica.client.generate_stream(self._prompt, timeout=self._timeout, **self._options)

    def _release(self, error: BaseException | None = None) -> None:
        """The current attempt is over: uncount it (once), recording its error."""
        replica, self._replica = self._replica, None
        if replica is None:
            return
        replica.in_flight -= 1
        if error is not None:
            self._pool.record(replica, error)

    @property
    def result(self) -> Result:
        if self._inner is None:
            raise DLMError("the request has not finished: read its stream to the end first")
        return self._inner.result

    async def aclose(self) -> None:
        self._done = True
        if self._inner is not None:
            try:
                await self._inner.aclose()
            finally:
                self._release()

    async def __aenter__(self) -> "PooledStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

