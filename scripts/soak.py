#!/usr/bin/env python3
"""Hold a bounded load on a running `dlm` server for a set time and report whether it stays healthy.

    python scripts/soak.py [--url 127.0.0.1:8001] [--metrics-url http://127.0.0.1:8002/metrics]
                           [--duration 600] [--concurrency 32] [--out artifacts/soak/soak.json] [--check]

Each of `--concurrency` clients sends valid requests back to back over gRPC: modes in turn, streamed or not, and
every `--cancel-every`-th streamed request closed after its first block (which cancels it on the server). Reported:
requests completed, cancelled and failed (any error on these valid requests is a failure), p99 latency per time
window, the server's resident memory (tritonserver and its Python-backend stub) after the first window and at the
end, and the live slots once the load has stopped. `--check` exits 1 when the targets are missed: no errors, memory
growth under 5 %, live slots back at 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import DLMError, GrpcClient  # noqa: E402
from export.tasks import held_out_set  # noqa: E402

MODES = ("diffusion", "ar", "speculative")


@dataclass
class Outcome:
    at: float  # seconds since the soak started, when the request ended
    latency: float
    kind: str  # "ok", "cancelled" or "error"
    error: str = ""


@dataclass
class Soak:
    url: str
    duration: float
    concurrency: int
    cancel_every: int
    prompts: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client_loop(self, index: int, start: float) -> None:
        client = GrpcClient(self.url, timeout=120)
        n = 0
        while time.monotonic() - start < self.duration:
            prompt = self.prompts[(index + n) % len(self.prompts)]
            mode = MODES[(index + n) % len(MODES)]
            streamed = (index + n) % 2 == 0
            cancel = streamed and n % self.cancel_every == self.cancel_every - 1
            sent = time.monotonic()
            try:
                if streamed:
                    with client.generate_stream(prompt, mode=mode, max_tokens=48) as stream:
                        for _ in stream:
                            if cancel:
                                break
                else:
                    client.generate(prompt, mode=mode, max_tokens=48)
                kind, error = ("cancelled" if cancel else "ok"), ""
            except DLMError as e:
                kind, error = "error", str(e)
            now = time.monotonic()
            with self.lock:
                self.outcomes.append(Outcome(now - start, now - sent, kind, error))
            n += 1
        client.close()


def server_rss(pid: int) -> int:
    """Resident bytes of the server process and its children (the Python-backend stub runs the model)."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def find_server_pid() -> int:
    found = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "tritonserver"]
    if len(found) != 1:
        raise SystemExit(f"found {len(found)} tritonserver processes; name one with --server-pid")
    return found[0]


def live_slots(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("dlm_live_slots "):
                return float(line.split()[1])
    raise RuntimeError(f"{metrics_url} has no dlm_live_slots")


def run(url: str, metrics_url: str, duration: float, concurrency: int, window: float, cancel_every: int = 5,
        server_pid: int | None = None) -> dict:
    pid = server_pid or find_server_pid()
    prompts = [p.prompt for p in held_out_set("upper", 8) + held_out_set("addition", 8)]
    soak = Soak(url, duration, concurrency, cancel_every, prompts)
    start = time.monotonic()
    threads = [threading.Thread(target=soak.client_loop, args=(i, start), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    memory = []  # (seconds, rss) after each window
    while any(t.is_alive() for t in threads):
        time.sleep(min(window, max(duration - (time.monotonic() - start), 0.5)))
        memory.append((round(time.monotonic() - start, 1), server_rss(pid)))
    deadline = time.monotonic() + 10
    slots = live_slots(metrics_url)
    while slots and time.monotonic() < deadline:  # the last cancellations take a step to land
        time.sleep(0.2)
        slots = live_slots(metrics_url)
    windows = []
    for begin in np.arange(0, duration, window):
        latencies = [o.latency for o in soak.outcomes if begin <= o.at < begin + window and o.kind == "ok"]
        if latencies:
            windows.append({"from_s": float(begin), "requests": len(latencies),
                            "p99_latency_s": float(np.percentile(latencies, 99))})
    kinds = [o.kind for o in soak.outcomes]
    rss_start, rss_end = memory[0][1], memory[-1][1]
    return {
        "duration_s": duration, "concurrency": concurrency, "window_s": window,
        "completed": kinds.count("ok"), "cancelled": kinds.count("cancelled"), "errors": kinds.count("error"),
        "error_messages": sorted({o.error for o in soak.outcomes if o.kind == "error"})[:10],
        "p99_latency_by_window": windows,
        "rss_bytes_start": rss_start, "rss_bytes_end": rss_end,
        "rss_growth": rss_end / rss_start - 1, "rss_by_window": memory,
        "live_slots_after": slots,
    }


def missed_targets(report: dict, rss_limit: float = 0.05) -> list[str]:
    """The soak's targets that `report` misses; `rss_limit` is the server's allowed memory growth (5 % over a
    long soak; a short one, whose allocators are still warming up, can only catch a gross leak)."""
    missed = []
    if report["errors"]:
        missed.append(f"{report['errors']} valid requests failed")
    if report["rss_growth"] >= rss_limit:
        missed.append(f"server memory grew {report['rss_growth']:.1%} (target < {rss_limit:.0%})")
    if report["live_slots_after"]:
        missed.append(f"{report['live_slots_after']:.0f} slots still live after the load stopped")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    parser.add_argument("--server-pid", type=int, default=None, help="tritonserver's pid (default: find it)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per latency and memory sample")
    parser.add_argument("--cancel-every", type=int, default=5, help="cancel every Nth streamed request")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "soak" / "soak.json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    report = run(args.url, args.metrics_url, args.duration, args.concurrency, args.window, args.cancel_every,
                 args.server_pid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    p99 = max((w["p99_latency_s"] for w in report["p99_latency_by_window"]), default=float("nan"))
    print(f"{report['completed']} completed, {report['cancelled']} cancelled, {report['errors']} errors; "
          f"worst window p99 {p99:.3f} s; server RSS {report['rss_bytes_start'] / 2**20:.0f} -> "
          f"{report['rss_bytes_end'] / 2**20:.0f} MiB ({report['rss_growth']:+.1%}); "
          f"live slots after: {report['live_slots_after']:.0f}; report: {args.out}")
    missed = missed_targets(report)
    for line in missed:
        print(f"target missed: {line}", file=sys.stderr)
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
