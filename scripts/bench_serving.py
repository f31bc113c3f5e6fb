"""Serving benchmark: the `dlm` model through Triton over gRPC streaming, a concurrency sweep in every mode, against
the same requests decoded in this process by the same graph and runtime.

    python scripts/bench_serving.py [--url HOST:PORT | --start-server] [--concurrency 1 4 16 64]
        [--modes ar diffusion speculative] [--requests N | --duration S] [--out artifacts/bench_serving]

Workload: held-out `upper:` problems of export/tasks.py (a 37-token answer, the end token included, decidable from
the prompt), so tokens per forward is meaningful. Each cell (concurrency × mode) runs `concurrency` clients, each
sending its next request as soon as its previous one finished (closed loop), until `max(--requests, 2 ×
concurrency)` requests are done (or `--duration` seconds have passed). Reported per cell: tokens/s and requests/s
over the cell's wall time, time to first block (p50), latency p50/p90/p99, tokens per forward (tokens over passes
after the prefill), exact-match accuracy, and each mode's tokens/s over `ar`'s.

Serving overhead: the same prompts, one request at a time, decoded in this process by `InProcessGenerator` over the
server's own artifact (model_repository/dlm/1/engine) with ONNX Runtime, and sent to the server (gRPC, unary), the
two paths alternating in blocks of 8 requests; the ratio of the medians is the serving overhead.

Writes bench_serving.json, serving.png (tokens/s and p99 latency against concurrency) and, from the quality
harness's quality.json (python -m export.evaluate), quality.png (accuracy and tokens per forward against threshold
and steps); prints the markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # triton_server.py: start scripts/serve.sh on free ports, as the tests do

from client import AsyncGrpcClient, GrpcClient, Result  # noqa: E402
from export.tasks import Problem, held_out_set  # noqa: E402

MINIATURE = ROOT / "export" / "miniature"
ENGINE = ROOT / "model_repository" / "dlm" / "1" / "engine"
# each row of the sweep and the request options it sends: `speculative` drafts with the engine's draft-only LoRA
# (the shipped miniature's artifact carries one), `speculative-base` with the base weights (draft_adapter false)
MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "ar": {"mode": "ar"}, "diffusion": {"mode": "diffusion"}, "speculative": {"mode": "speculative"},
    "speculative-base": {"mode": "speculative", "draft_adapter": False},
}
MODES = tuple(MODE_OPTIONS)
BLOCK = 8  # requests in a row on one path of the overhead comparison
TARGETS = {  # issue 4's serving targets
    "overhead": 1.15,  # end-to-end latency of one request over gRPC ÷ in-process, at most
    "scaling_16": 4.0,  # tokens/s at 16 concurrent clients ÷ at 1, at least
    "diffusion_vs_ar": 2.5,  # tokens/s at concurrency 1, at least
    "speculative_vs_ar": 3.0,
}


@dataclass
class Cell:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    tokens_per_s: float
    requests_per_s: float
    ttfb_p50: float
    latency_p50: float
    latency_p90: float
    latency_p99: float
    tokens_per_forward: float
    accuracy: float
    vs_ar: float | None = None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def summarize(mode: str, concurrency: int, done: list[tuple[Problem, Result]], seconds: float) -> Cell:
    results = [r for _, r in done]
    latencies = [r.latency for r in results]
    tokens = sum(r.num_tokens for r in results)
    return Cell(
        mode, concurrency, len(results), seconds, tokens / seconds, len(results) / seconds,
        percentile([r.time_to_first_block for r in results], 50), percentile(latencies, 50),
        percentile(latencies, 90), percentile(latencies, 99),
        tokens / max(sum(r.num_forwards - 1 for r in results), 1),
        sum(r.text == p.answer for p, r in done) / len(done),
    )


async def run_cell(url: str, mode: str, concurrency: int, problems: list[Problem], count: int | None,
                   duration: float | None, max_tokens: int) -> Cell:
    """`concurrency` closed-loop clients streaming requests until `count` are done or `duration` has passed."""
    async with AsyncGrpcClient(url) as client:
        done: list[tuple[Problem, Result]] = []
        order = itertools.count()
        start = time.perf_counter()

        async def worker() -> None:
            while True:
                i = next(order)
                if (count is not None and i >= count) or (duration is not None
                                                          and time.perf_counter() - start > duration):
                    return
                problem = problems[i % len(problems)]
                stream = client.generate_stream(problem.prompt, max_tokens=max_tokens, **MODE_OPTIONS[mode])
                async with stream:
                    async for _ in stream:
                        pass
                done.append((problem, stream.result))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summarize(mode, concurrency, done, time.perf_counter() - start)


def sweep(url: str, modes: list[str], levels: list[int], problems: list[Problem], requests: int,
          duration: float | None, max_tokens: int) -> list[Cell]:
    cells = []
    for concurrency in levels:
        count = None if duration else max(requests, 2 * concurrency)
        for k in range(len(modes)):  # the modes take turns leading, so drift in the machine's load is shared
            mode = modes[(k + concurrency) % len(modes)]
            cell = asyncio.run(run_cell(url, mode, concurrency, problems, count, duration, max_tokens))
            cells.append(cell)
            print(f"  concurrency {concurrency:3d} {mode:12s} {cell.tokens_per_s:8.1f} tokens/s  "
                  f"p50 {cell.latency_p50 * 1000:7.1f} ms  p99 {cell.latency_p99 * 1000:7.1f} ms  "
                  f"{cell.tokens_per_forward:5.2f} tokens/forward  accuracy {cell.accuracy:.0%}", flush=True)
    for cell in cells:
        ar = next((c for c in cells if c.mode == "ar" and c.concurrency == cell.concurrency), None)
        cell.vs_ar = cell.tokens_per_s / ar.tokens_per_s if ar else None
    return cells


def overhead(url: str, modes: list[str], problems: list[Problem], max_tokens: int) -> dict[str, dict[str, Any]]:
    """Serving latency over in-process latency, one request at a time, the two alternating in blocks of requests."""
    from dlm.refine import GenerationParams
    from export.inprocess import InProcessGenerator

    generator = InProcessGenerator(MINIATURE, artifact=ENGINE, runtime="onnxruntime")
    out = {}
    with GrpcClient(url) as client:
        for mode in modes:
            options = MODE_OPTIONS[mode]
            params = GenerationParams(max_tokens=max_tokens, **options)
            for problem in problems[:2]:  # warm both paths up
                generator.generate([problem.prompt], params)
                client.generate(problem.prompt, max_tokens=max_tokens, **options)
            local: list[float] = []
            served: list[float] = []
            same = 0
            for start in range(0, len(problems), BLOCK):  # alternate in blocks: neither path runs right after the
                block = problems[start : start + BLOCK]  # other's last pass every time (ONNX Runtime's threads spin)
                mine = [generator.generate([p.prompt], params)[0] for p in block]
                theirs = [client.generate(p.prompt, max_tokens=max_tokens, **options) for p in block]
                local += [m.seconds for m in mine]
                served += [t.latency for t in theirs]
                same += sum((m.text, m.num_forwards) == (t.text, t.num_forwards) for m, t in zip(mine, theirs))
            out[mode] = {
                "requests": len(problems), "in_process_p50": statistics.median(local),
                "served_p50": statistics.median(served), "ratio": statistics.median(served) / statistics.median(local),
                "same_text_and_passes": same / len(problems),
            }
            print(f"  {mode:12s} in-process {out[mode]['in_process_p50'] * 1000:6.1f} ms  served (gRPC, unary) "
                  f"{out[mode]['served_p50'] * 1000:6.1f} ms  ratio {out[mode]['ratio']:.3f}", flush=True)
    return out


def targets(cells: list[Cell], costs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def cell(mode: str, concurrency: int) -> Cell | None:
        return next((c for c in cells if c.mode == mode and c.concurrency == concurrency), None)

    rows = []
    for mode, cost in costs.items():
        rows.append({"target": f"{mode}: latency via gRPC ÷ in-process, one request", "value": cost["ratio"],
                     "goal": f"≤ {TARGETS['overhead']}", "met": cost["ratio"] <= TARGETS["overhead"]})
    for mode in MODES:
        one, sixteen = cell(mode, 1), cell(mode, 16)
        if one and sixteen:
            value = sixteen.tokens_per_s / one.tokens_per_s
            rows.append({"target": f"{mode}: tokens/s at 16 clients ÷ at 1", "value": value,
                         "goal": f"≥ {TARGETS['scaling_16']}", "met": value >= TARGETS["scaling_16"]})
    for mode in ("diffusion", "speculative"):
        goal = TARGETS[f"{mode}_vs_ar"]
        one = cell(mode, 1)
        if one and one.vs_ar is not None:
            rows.append({"target": f"{mode} tokens/s ÷ ar tokens/s, concurrency 1, streamed", "value": one.vs_ar,
                         "goal": f"≥ {goal}", "met": one.vs_ar >= goal})
        if mode in costs and "ar" in costs:  # the same requests (same tokens) unary: the inverse latency ratio
            value = costs["ar"]["served_p50"] / costs[mode]["served_p50"]
            rows.append({"target": f"{mode} tokens/s ÷ ar tokens/s, concurrency 1, unary", "value": value,
                         "goal": f"≥ {goal}", "met": value >= goal})
    return rows


def plot_serving(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, p99) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = sorted((c for c in cells if c.mode == mode), key=lambda c: c.concurrency)
        if rows:
            levels = [c.concurrency for c in rows]
            throughput.plot(levels, [c.tokens_per_s for c in rows], "o-", label=mode)
            p99.plot(levels, [c.latency_p99 * 1000 for c in rows], "o-", label=mode)
    throughput.set(title="throughput", xlabel="concurrent clients", ylabel="tokens / s", xscale="log")
    p99.set(title="p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
    for ax in (throughput, p99):
        ax.set_xticks([c.concurrency for c in cells if c.mode == cells[0].mode])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_quality(quality: Path, path: Path) -> bool:
    """The quality harness's figure (accuracy and tokens per forward against threshold and steps), redrawn."""
    from export.evaluate import Score, plot

    if not quality.is_file():
        print(f"no {quality}: run `python -m export.evaluate --count 50` for the accuracy plot", file=sys.stderr)
        return False
    plot([Score(**s) for s in json.loads(quality.read_text())["scores"]], path)
    return True


def machine() -> dict[str, Any]:
    def lscpu(field: str) -> str:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(field)), "")

    import onnxruntime

    return {"cpu": lscpu("Model name") or platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def markdown(cells: list[Cell], costs: dict[str, dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    lines = ["| mode | clients | tokens/s | × ar | requests/s | first block p50 ms | latency p50 / p90 / p99 ms "
             "| tokens / forward | accuracy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in sorted(cells, key=lambda c: (MODES.index(c.mode), c.concurrency)):
        lines.append(
            f"| {c.mode} | {c.concurrency} | {c.tokens_per_s:.0f} | {c.vs_ar:.2f} | {c.requests_per_s:.1f} | "
            f"{c.ttfb_p50 * 1000:.1f} | {c.latency_p50 * 1000:.0f} / {c.latency_p90 * 1000:.0f} / "
            f"{c.latency_p99 * 1000:.0f} | {c.tokens_per_forward:.2f} | {c.accuracy:.0%} |")
    lines += ["", "| mode | in-process p50 ms | via Triton gRPC p50 ms | ratio |", "| --- | --- | --- | --- |"]
    for mode, cost in costs.items():
        lines.append(f"| {mode} | {cost['in_process_p50'] * 1000:.1f} | {cost['served_p50'] * 1000:.1f} | "
                     f"{cost['ratio']:.3f} |")
    lines += ["", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for goal in goals:
        lines.append(f"| {goal['target']} | {goal['value']:.2f} | {goal['goal']} | {'yes' if goal['met'] else '**no**'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton's gRPC address")
    parser.add_argument("--start-server", action="store_true", help="start scripts/serve.sh on free ports first")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--requests", type=int, default=16, help="requests per cell, at least (2 × concurrency)")
    parser.add_argument("--duration", type=float, help="seconds per cell instead of a request count")
    parser.add_argument("--overhead-requests", type=int, default=24, help="requests per mode in the overhead pairs")
    parser.add_argument("--problems", type=int, default=64, help="held-out upper problems to cycle through")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--quality", type=Path, default=ROOT / "artifacts" / "quality" / "quality.json")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench_serving")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    problems = held_out_set("upper", args.problems)
    server = None
    if args.start_server:
        from triton_server import start_server

        server = start_server(args.out / "server.log")
        args.url = server.grpc_url
        print(f"started tritonserver (gRPC {args.url}); log in {args.out / 'server.log'}", flush=True)
    began = time.perf_counter()
    try:
        print("warm-up", flush=True)
        for mode in args.modes:
            asyncio.run(run_cell(args.url, mode, 4, problems, 8, None, args.max_tokens))
        print("serving overhead: in-process vs Triton, one request at a time", flush=True)
        costs = overhead(args.url, args.modes, problems[: args.overhead_requests], args.max_tokens)
        print("concurrency sweep (gRPC streaming)", flush=True)
        cells = sweep(args.url, args.modes, args.concurrency, problems, args.requests, args.duration, args.max_tokens)
    finally:
        if server is not None:
            server.stop()
    goals = targets(cells, costs)
    record = {
        "machine": machine(), "workload": f"{args.problems} held-out upper problems (export/tasks.py), "
        f"max_tokens {args.max_tokens}, temperature 0, server defaults otherwise", "transport": "Triton gRPC streaming",
        "seconds": time.perf_counter() - began, "overhead": costs, "cells": [c.__dict__ for c in cells],
        "targets": goals,
    }
    (args.out / "bench_serving.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_serving(cells, args.out / "serving.png")
    plot_quality(args.quality, args.out / "quality.png")
    print(markdown(cells, costs, goals))
    print(f"wrote {args.out}/bench_serving.json and its plots in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
