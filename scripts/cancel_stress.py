#!/usr/bin/env python3
"""Cancel gRPC streams over and over and report whether the server survives: the check behind the
`cancelled_final_delay` parameter (README, "Cancellation").

    python scripts/cancel_stress.py [--rounds 4800] [--delay 0.1] [--out docs/cancel_stress/delay-0.1.json]

Starts the embedded tritonserver (`scripts/serve.sh`, verbose log) over a copy of the model repository whose
`cancelled_final_delay` is `--delay`. Each round streams an `ar` request that cannot finish first, closes the stream
after its first response (which cancels the request on the server), then sends a short request. Triton 2.51's gRPC
frontend crashes when the last response of a cancelled request arrives before it has processed the write that the
cancellation cut short (triton-inference-server/server#8078). A server that dies is replaced and the rounds go on.
Reported: rounds run, failed requests, servers that died, and from their logs how many cancellations caught a write
in flight (the risky moment) and how many took the crashing path ("Completing cancellation ... rpc_ok=0").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from client import DLMError, GrpcClient  # noqa: E402
from triton_server import ENDLESS_PROMPT, ENDLESS_TOKENS, repository_with, start_server  # noqa: E402

SHORT = "4821+377="


def one_round(url: str) -> str:
    """A cancelled stream, then a short request; '' when both went as they should, else what failed."""
    client = GrpcClient(url, timeout=30)
    try:
        with client.generate_stream(ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS) as stream:
            next(iter(stream))  # leaving the block closes the stream, which cancels the request
        if not client.generate(SHORT, mode="ar").text:
            return "the short request came back empty"
        return ""
    except (DLMError, StopIteration) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        client.close()


def log_counts(log: str) -> dict[str, int]:
    return {
        "cancellations_seen": len(re.findall(r"Cancellation notification received", log)),
        "cancelled_during_a_write": len(re.findall(r"Cancellation notification received.*step WRITTEN", log)),
        "crashing_path": len(re.findall(r"Completing cancellation .*rpc_ok=0.*step CANCELLED", log)),
        "server_signals": len(re.findall(r"Signal \(\d+\) received", log)),
    }


class SignalWatch:
    """Whether the server's log has reported a signal, reading only what was written since the last look (a
    verbose log grows by tens of MB per run)."""

    def __init__(self, log: Path):
        self.log, self.offset, self.seen = log, 0, False

    def __call__(self) -> bool:
        start = max(0, self.offset - 16)  # a marker may straddle two reads
        with open(self.log, "rb") as f:
            f.seek(start)
            chunk = f.read()
        self.offset = start + len(chunk)
        self.seen = self.seen or b"Signal (" in chunk
        return self.seen


def run(url: str, rounds: int, server_alive, round_timeout: float = 60.0) -> dict:
    """`rounds` rounds against the server at `url`; stops at the first round that hangs or kills the server."""
    errors: list[str] = []
    died_at = None
    start = time.monotonic()
    done = 0
    for i in range(rounds):
        outcome: list[str] = []
        # a server that aborts can hang instead of exiting: each round gets a deadline
        worker = threading.Thread(target=lambda: outcome.append(one_round(url)), daemon=True)
        worker.start()
        worker.join(round_timeout)
        done += 1
        if worker.is_alive():
            errors.append(f"round {i} hung for {round_timeout} s")
        elif outcome[0]:
            errors.append(f"round {i}: {outcome[0]}")
        if worker.is_alive() or not server_alive():
            died_at = i
            break
    return {"rounds": done, "errors": len(errors), "first_errors": errors[:5], "server_died_at_round": died_at,
            "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4800)
    parser.add_argument("--delay", default="0.1", help="cancelled_final_delay for this run, in seconds")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()

    rounds, errors, deaths, seconds = 0, 0, 0, 0.0
    first_errors: list[str] = []
    counts = dict.fromkeys(log_counts(""), 0)
    with tempfile.TemporaryDirectory() as directory:
        repository = repository_with(Path(directory) / "repository", cancelled_final_delay=args.delay)
        while rounds < args.rounds:  # a server that dies is replaced, and the count goes on
            log = Path(directory) / f"server-{deaths}.log"
            server = start_server(log, repository, extra_args=["--log-verbose=1"])
            try:
                signalled = SignalWatch(log)
                part = run(server.grpc_url, args.rounds - rounds,
                           lambda: server.process.poll() is None and not signalled())
            finally:
                server.kill()
            rounds, errors, seconds = rounds + part["rounds"], errors + part["errors"], seconds + part["seconds"]
            deaths += part["server_died_at_round"] is not None
            first_errors = (first_errors + part["first_errors"])[:5]
            for key, value in log_counts(log.read_text(errors="replace")).items():
                counts[key] += value
    report = {"cancelled_final_delay": float(args.delay), "rounds": rounds, "errors": errors,
              "first_errors": first_errors, "server_deaths": deaths, "seconds": round(seconds, 1), **counts}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
