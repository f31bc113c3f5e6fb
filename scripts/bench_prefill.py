#!/usr/bin/env python3
"""Chunked prefill and pass padding on the shipped miniature, in this process through the `Scheduler` Triton runs
(dlm/scheduler.py), over the server's own artifact (model_repository/dlm/1/engine/model.onnx, ONNX Runtime, as
config.pbtxt's `auto` picks on a CPU) with its tokenizer, end tokens, max_live and context. Triton's own overhead
(gRPC, the Python stub) is left out: it adds about the same to a request idle or busy (docs/benchmarks.md).

(a) Time to first block of a short request (a held-out `upper:` problem, diffusion at threshold 0.9, the server's
    defaults) that arrives while a prompt of the maximum length (the context less one block and one token: 991 of
    1024 positions) is being prefilled, against the same request on the idle scheduler. Idle and busy runs
    alternate; the busy arrivals are spread evenly over the long prompt's prefill (its idle duration, measured
    first), and each is checked to have come before the long prompt's prefill finished. Time to first block is
    what `dlm_time_to_first_block_seconds` records: submission to the first committed block (`Job.first_block_at`).
    Medians over `--repeats`, side by side in one run.
(b) The padded share of the tokens of each engine pass in a mixed workload: short prompts (held-out problems, every
    mode) and long ones (256 to 900 tokens), arriving a seeded 0 to 3 passes apart, `max_live` decoded together.
    *After*: the planner's passes as the scheduler ran them (its observer's `step` events: the tokens of
    `dlm_pass_tokens_total`). *Before*: for each of the same steps, what `refine.step` would have padded with every
    live row in one pass, as the loop did before the planner (B × T over all the step's rows, `scheduler.pass_tokens`
    over one group). The rows are the same in both (prompts chunked as now; before the planner a prompt was prefilled
    whole, which pads more still).

Both parts run for each `--max-num-tokens` (config.pbtxt's per-pass budget): 1024 is one whole prefill per pass (no
chunking of a 991-token prompt), 512 is the shipped value, 64 the least this artifact allows (one block of its
longest, --max-block); prompts are prefilled in chunks of the budget. Part (a) runs also with each
`--prefill-chunk` below the budget (config.pbtxt's `prefill_chunk`; the shipped 64 among them). A step runs its
passes fewest tokens first.

    python scripts/bench_prefill.py [--max-num-tokens 1024 512 256 128 64] [--prefill-chunk 64 32] [--repeats 21]
        [--requests 48] [--threads N] [--out docs/bench_prefill]
    python scripts/bench_prefill.py --plot [--out docs/bench_prefill]   # only redraw the plot from the JSON there

Writes bench_prefill.json and bench_prefill.png (both parts plotted) to --out and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inprocess_bench, beside this script

import dlm.scheduler as scheduler_module  # noqa: E402
from dlm.planner import MAX_PADDING, PassLimits  # noqa: E402
from dlm.refine import GenerationParams, TokenSpec  # noqa: E402
from dlm.runtime import OnnxRuntime  # noqa: E402
from dlm.scheduler import Job, Scheduler, pass_tokens  # noqa: E402
from dlm.special_tokens import end_token_ids  # noqa: E402
from dlm.text import TextCodec  # noqa: E402
from export.tasks import held_out_set  # noqa: E402
from inprocess_bench import Done, machine, parameter, run_one, ttfb  # noqa: E402

VERSION = ROOT / "model_repository" / "dlm" / "1"
MODES = ("ar", "diffusion", "speculative")
TARGETS = {"ttfb_ratio": 3.0, "padding": MAX_PADDING}  # issue 11: busy ÷ idle at most; padded share at most



class Observer:
    """The scheduler's observer: every pass's tokens, admissions, and a hook called after each pass."""

    def __init__(self) -> None:
        self.passes: list[tuple[float, int, int, int]] = []  # seconds, rows, real tokens, padding tokens
        self.admitted_event = threading.Event()
        self.after_pass: Any = None
        self.hook_errors: list[Exception] = []

    def step(self, seconds: float, rows: int, real_tokens: int, padding_tokens: int) -> None:
        self.passes.append((seconds, rows, real_tokens, padding_tokens))
        if self.after_pass is not None:
            try:
                self.after_pass(len(self.passes))
            except Exception as e:  # noqa: BLE001 - reported by the run, never swallowed by the scheduler
                self.hook_errors.append(e)

    def admitted(self, job: Job) -> None:
        self.admitted_event.set()

    def first_block(self, job: Job) -> None: ...

    def kv_positions(self, positions: int) -> None: ...

    def occupancy(self, live: int, waiting: int) -> None: ...

    def finished(self, job: Job) -> None: ...

    def rejected(self, params: GenerationParams) -> None: ...


class Server:
    """What model.py builds, without Triton: the artifact, tokenizer and scheduler limits of the repository."""

    def __init__(self, threads: int | None):
        config = json.loads((VERSION / "tokenizer" / "config.json").read_text())
        self.codec = TextCodec(VERSION / "tokenizer")
        self.spec = TokenSpec.from_config(config, end_token_ids(VERSION / "tokenizer"))
        spin = parameter("runtime_spin").strip().lower() in ("1", "true", "yes")
        self.runtime = OnnxRuntime(VERSION / "engine", config, threads=threads, spin=spin)
        self.profile = self.runtime.contract.profile
        self.context = int(parameter("context") or self.profile.max_context)
        self.max_live = int(parameter("max_live") or 16)
        self.pad = int(config.get("pad_token_id") or 0)
        self.block = self.spec.block_size

    def scheduler(self, budget: int, observer: Observer, chunk: int | None = None) -> Scheduler:
        return Scheduler(self.runtime, self.spec, max_live=self.max_live, max_queue=1024, context=self.context,
                         observer=observer, pad_token_id=self.pad,
                         limits=PassLimits.from_profile(self.profile, budget, chunk))



def first_block_during_prefill(server: Server, budget: int, repeats: int, chunk: int | None = None
                               ) -> dict[str, Any]:
    return _first_block_during_prefill(server, budget, repeats, chunk)


def _first_block_during_prefill(server: Server, budget: int, repeats: int, chunk_tokens: int | None) -> dict[str, Any]:
    observer = Observer()
    scheduler = server.scheduler(budget, observer, chunk_tokens)
    short = server.codec.encode(held_out_set("upper", 1)[0].prompt)
    short_params = GenerationParams("diffusion", max_tokens=48, threshold=0.9)
    longest = server.context - 1 - server.block  # prompt + max_tokens 1 + one block = the context
    long_prompt = (server.codec.encode("1+" * server.context) * 2)[:longest]
    long_params = GenerationParams("diffusion", max_tokens=1, threshold=0.9)
    try:
        for _ in range(3):  # warm-up (the long prompt warms up in the first long_alone runs)
            run_one(scheduler, short, short_params)
        prefills: list[float] = []

        def long_alone() -> None:
            job = run_one(scheduler, long_prompt, long_params)
            assert job.first_block_at is not None and job.admitted_at is not None
            prefills.append(job.first_block_at - job.admitted_at)

        for _ in range(4):
            long_alone()
        # arrivals spread evenly over the prefill, in a shuffled order so that a change of the machine's load
        # during the run does not line up with them
        fractions = [(i + 0.5) / repeats for i in range(repeats)]
        random.Random(budget).shuffle(fractions)
        idle, busy, during, waits = [], [], [], []
        for fraction in fractions:
            idle.append(ttfb(run_one(scheduler, short, short_params)))
            long_alone()  # the prefill's duration now: the last few alone
            prefill = statistics.median(prefills[-5:])
            long_done, short_done = Done(), Done()
            observer.admitted_event.clear()
            long_job = scheduler.submit(long_prompt, long_params, long_done)
            observer.admitted_event.wait(60)
            time.sleep(0.9 * prefill * fraction)
            short_job = scheduler.submit(short, short_params, short_done)
            long_done.wait()
            short_done.wait()
            assert long_job.first_block_at is not None
            during.append(long_job.first_block_at > short_job.submitted)
            busy.append(ttfb(short_job))
            waits.append((short_job.admitted_at or short_job.submitted) - short_job.submitted)
    finally:
        scheduler.stop()
    arrived = [t for t, d in zip(busy, during) if d] or busy  # what came while the long prompt was prefilled
    idle_median, busy_median = statistics.median(idle), statistics.median(arrived)
    chunk = PassLimits.from_profile(server.profile, budget, chunk_tokens).chunk
    return {
        "max_num_tokens": budget, "chunk": chunk, "long_prompt_tokens": len(long_prompt),
        "prefill_passes": -(-len(long_prompt) // chunk), "short_prompt_tokens": len(short),
        "long_prefill_ms": statistics.median(prefills) * 1000, "repeats": repeats,
        "idle_ms": [t * 1000 for t in idle], "busy_ms": [t * 1000 for t in busy],
        "idle_p50_ms": idle_median * 1000, "busy_p50_ms": busy_median * 1000,
        "idle_p90_ms": float(np.percentile(idle, 90)) * 1000,
        "busy_p90_ms": float(np.percentile(arrived, 90)) * 1000,
        "busy_queue_wait_p50_ms": statistics.median(waits) * 1000,
        "ratio": busy_median / idle_median, "arrived_during_prefill": sum(during) / len(during),
    }


def workload(server: Server, count: int, seed: int) -> list[tuple[int, list[int], GenerationParams]]:
    """(arrival pass, prompt, params) of the mixed workload: a quarter long prompts, the rest short ones."""
    rng = random.Random(seed)
    problems = held_out_set("upper", count) + held_out_set("addition", count)
    rng.shuffle(problems)
    filler = server.codec.encode("1+" * server.context) * 2
    requests, arrival = [], 0
    for i in range(count):
        mode = MODES[i % len(MODES)]
        if rng.random() < 0.25:
            length = rng.randint(256, min(900, server.context - 2 * server.block))
            prompt, params = filler[:length], GenerationParams(mode, max_tokens=rng.randint(16, server.block))
        else:
            prompt, params = server.codec.encode(problems[i].prompt), GenerationParams(mode, max_tokens=40)
        requests.append((arrival, prompt, params))
        arrival += rng.randint(0, 3)
    return requests


def shares(passes: list[tuple[int, int]]) -> dict[str, Any]:
    share = [padding / (real + padding) for real, padding in passes]
    real, padding = sum(r for r, _ in passes), sum(p for _, p in passes)
    return {
        "passes": len(passes), "real_tokens": real, "padding_tokens": padding,
        "padded_share": padding / (real + padding),  # of all the tokens the passes ran
        "pass_share_p50": float(np.median(share)), "pass_share_p90": float(np.percentile(share, 90)),
        "pass_share_max": max(share),
        "passes_over_target": sum(s > TARGETS["padding"] for s in share) / len(share),
    }


def padding_in_mixed_workload(server: Server, budget: int, count: int, seed: int) -> dict[str, Any]:
    """Part (b) at one per-pass budget."""
    observer = Observer()
    steps: list[tuple[int, int]] = []  # one group per step: what refine.step would have padded
    plan_step = scheduler_module.plan_step

    def recorded_plan_step(seqs: Any, limits: Any) -> Any:
        groups = plan_step(seqs, limits)
        steps.append(pass_tokens([plan for _, plans in groups for plan in plans]))
        return groups

    requests = workload(server, count, seed)
    consumers = [Done() for _ in requests]
    submitted = 0
    lock = threading.Lock()

    def arrive(passes_run: int, force: bool = False) -> None:
        nonlocal submitted
        with lock:
            while submitted < len(requests) and (force or requests[submitted][0] <= passes_run):
                _, prompt, params = requests[submitted]
                scheduler.submit(prompt, params, consumers[submitted])
                submitted += 1
                force = False

    scheduler_module.plan_step = recorded_plan_step
    scheduler = server.scheduler(budget, observer)
    start = time.perf_counter()
    try:
        observer.after_pass = arrive
        arrive(0, force=True)
        while submitted < len(requests):  # the scheduler went idle before the next arrival: it arrives now
            time.sleep(0.01)
            if scheduler.live == 0 and scheduler.waiting == 0:
                arrive(len(observer.passes), force=True)
        for consumer in consumers:
            consumer.wait()
        seconds = time.perf_counter() - start
    finally:
        scheduler.stop()
        scheduler_module.plan_step = plan_step
    if observer.hook_errors:
        raise observer.hook_errors[0]
    after = [(real, padding) for _, _, real, padding in observer.passes]
    if sum(r for r, _ in after) != sum(r for r, _ in steps):
        raise AssertionError("the planner's passes and the steps they came from ran different tokens")
    long = sum(len(prompt) > 2 * server.block for _, prompt, _ in requests)
    return {"max_num_tokens": budget, "requests": len(requests), "long_requests": long, "steps": len(steps),
            "seconds": seconds, "before": shares(steps), "after": shares(after)}



def targets(first_block: list[dict[str, Any]], padding: list[dict[str, Any]], shipped: tuple[int, int]
            ) -> list[dict[str, Any]]:
    out = []
    for a in first_block:
        out.append({"target": f"first block during a max-length prefill ÷ idle ≤ {TARGETS['ttfb_ratio']:g} "
                              f"(max_num_tokens {a['max_num_tokens']}, chunk {a['chunk']})",
                    "shipped": (a["max_num_tokens"], a["chunk"]) == shipped,
                    "measured": a["ratio"], "met": a["ratio"] <= TARGETS["ttfb_ratio"]})
    for b in padding:
        worst = b["after"]["pass_share_max"]
        out.append({"target": f"padded share of a pass's tokens ≤ {TARGETS['padding']:.0%} "
                              f"(max_num_tokens {b['max_num_tokens']})", "shipped": b["max_num_tokens"] == shipped[0],
                    "measured": worst, "met": worst <= TARGETS["padding"]})
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = ["| max_num_tokens | prefill passes of the long prompt | its prefill ms "
             "| idle first block p50 / p90 ms | during the prefill p50 / p90 ms | ratio | arrived during prefill |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in record["first_block"]:
        lines.append(f"| {a['max_num_tokens']} | {a['prefill_passes']} × {a['chunk']} | "
                     f"{a['long_prefill_ms']:.1f} | "
                     f"{a['idle_p50_ms']:.1f} / {a['idle_p90_ms']:.1f} | {a['busy_p50_ms']:.1f} / "
                     f"{a['busy_p90_ms']:.1f} | {a['ratio']:.2f} | {a['arrived_during_prefill']:.0%} |")
    lines += ["", "| max_num_tokens | grouping | passes | padded share of all tokens | per pass p50 / p90 / max "
              "| passes over 25 % |", "| --- | --- | --- | --- | --- | --- |"]
    for b in record["padding"]:
        for name, label in (("before", "one pass per step (before)"), ("after", "pass planner (after)")):
            s = b[name]
            lines.append(f"| {b['max_num_tokens']} | {label} | {s['passes']} | {s['padded_share']:.1%} | "
                         f"{s['pass_share_p50']:.1%} / {s['pass_share_p90']:.1%} / {s['pass_share_max']:.1%} | "
                         f"{s['passes_over_target']:.0%} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in record["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.2f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Part (a): time to first block idle and during the long prefill, per setting; part (b): the padded share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shipped = (record["settings"]["shipped_max_num_tokens"], record["settings"]["shipped_prefill_chunk"])
    fig, (first, padded) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    rows = record["first_block"]
    xs = np.arange(len(rows))
    first.bar(xs - 0.2, [a["idle_p50_ms"] for a in rows], 0.4, label="idle")
    first.bar(xs + 0.2, [a["busy_p50_ms"] for a in rows], 0.4,
              label=f"during a {rows[0]['long_prompt_tokens']}-token prefill" if rows else "during the prefill")
    for x, a in zip(xs, rows):
        first.annotate(f"{a['ratio']:.1f}×", (x + 0.2, a["busy_p50_ms"]), ha="center", va="bottom", fontsize=8)
    first.set_xticks(xs, [f"{a['max_num_tokens']}\n{a['prefill_passes']} × {a['chunk']}"
                          + ("\n(shipped)" if (a["max_num_tokens"], a["chunk"]) == shipped else "") for a in rows],
                     fontsize=8)
    first.set(title="(a) a short request's first block, p50", ylabel="ms",
              xlabel="max_num_tokens, and the long prompt's prefill passes × chunk")
    budgets = [b["max_num_tokens"] for b in record["padding"]]
    xs = np.arange(len(budgets))
    for offset, name, label in ((-0.2, "before", "every live row in one pass"), (0.2, "after", "pass planner")):
        padded.bar(xs + offset, [100 * b[name]["padded_share"] for b in record["padding"]], 0.4, label=label)
    padded.plot(xs + 0.2, [100 * b["after"]["pass_share_max"] for b in record["padding"]], "k_", markersize=14,
                label="planner: worst pass")
    padded.axhline(100 * TARGETS["padding"], color="grey", linestyle=":", linewidth=1)
    padded.set_xticks(xs, [str(b) for b in budgets])
    padded.set(title="(b) padded share of the tokens", ylabel="%", xlabel="max_num_tokens")
    for ax in (first, padded):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-num-tokens", type=int, nargs="+", default=[1024, 512, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--requests", type=int, default=48, help="requests of the mixed workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-chunk", type=int, nargs="*", default=[64, 32],
                        help="part (a) also with these prefill chunks, where below the budget")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_prefill")
    parser.add_argument("--plot", action="store_true",
                        help="only redraw bench_prefill.png from the bench_prefill.json in --out")
    args = parser.parse_args(argv)
    if args.plot:
        record = json.loads((args.out / "bench_prefill.json").read_text())
        plot(record, args.out / "bench_prefill.png")
        print(f"wrote {args.out / 'bench_prefill.png'}", file=sys.stderr)
        return record
    if not (VERSION / "engine" / "model.onnx").is_file():
        raise SystemExit(f"no artifact in {VERSION / 'engine'}: run scripts/prepare_repository.sh")
    server = Server(args.threads)
    start = time.perf_counter()
    runs = [(budget, None) for budget in args.max_num_tokens]
    runs += [(budget, chunk) for budget in args.max_num_tokens for chunk in args.prefill_chunk if chunk < budget]
    first_block = [first_block_during_prefill(server, budget, args.repeats, chunk) for budget, chunk in runs]
    padding = [padding_in_mixed_workload(server, budget, args.requests, args.seed) for budget in args.max_num_tokens]
    shipped_budget = int(parameter("max_num_tokens") or server.profile.tokens[2])
    shipped = (shipped_budget, PassLimits.from_profile(server.profile, shipped_budget,
                                                       int(parameter("prefill_chunk") or 0) or None).chunk)
    record = {
        "what": "scripts/bench_prefill.py: in-process Scheduler over model_repository/dlm/1/engine (ONNX Runtime)",
        "machine": machine(), "seconds": time.perf_counter() - start,
        "settings": {"max_live": server.max_live, "context": server.context, "shipped_max_num_tokens": shipped[0],
                     "shipped_prefill_chunk": shipped[1],
                     "artifact_profile": {"batch": list(server.profile.batch), "tokens": list(server.profile.tokens),
                                          "max_context": server.profile.max_context},
                     "threads": args.threads, "seed": args.seed},
        "first_block": first_block, "padding": padding, "targets": targets(first_block, padding, shipped),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefill.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.out / "bench_prefill.png")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
