#!/usr/bin/env python3
"""Per-pass cost of the decoding loop at the real vocabulary (131,072), per mode and batch.

Writes a random-weight checkpoint with the real vocabulary, head size and KV heads (`export/random_checkpoint.py`;
default 2 layers, hidden 1024, sharded bf16), exports it with `python -m export onnx` (fp32, what the CPU runs),
and decodes batches of random prompts with the project's own loop (`dlm.refine.step`) over ONNX Runtime. For every
engine pass after the prefill it records:

- `engine_ms`: ONNX Runtime's own run (`run_with_iobinding`);
- `runtime_host_ms`: the rest of `runtime.forward` and `runtime.commit` (host inputs, the cache gather into the
  pass's past, reading the outputs, the cache commit);
- `loop_ms`: everything outside the runtime: planning the pass, choosing tokens from the candidates, committing
  them (`dlm.refine` and `dlm.candidates`), as measured in the run;
- `loop_replayed_ms`: the same loop work measured again by replaying the run's recorded candidates through
  `dlm.refine.step` with no engine in between, so the figure is not inflated by the engine's threads or by other
  processes sharing the cores (the two agree where the machine is quiet);
- `returned_bytes`: what the engine hands back to the loop (candidates and logsumexp; the new keys and values stay
  with the runtime), against what contract version 1 returned for the same pass (float32 logits, T × V per row).

Medians over the passes, side by side in one run; JSON and a plot of it to --out. Usage:
    python scripts/bench_step.py [--layers 2] [--hidden 1024] [--batches 1,8,16] [--out docs/bench_step]
    python scripts/bench_step.py --plot [--out docs/bench_step]   # only redraw bench_step.png from the JSON there
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.candidates import Candidates  # noqa: E402
from dlm.refine import GenerationParams, Sequence, TokenSpec, step  # noqa: E402
from dlm.runtime import OnnxRuntime  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.random_checkpoint import real_scale_config, write_random_checkpoint  # noqa: E402

MODES = {
    "ar": GenerationParams("ar"),
    "diffusion": GenerationParams("diffusion", threshold=0.9),
    "speculative": GenerationParams("speculative"),
}


class Timed:
    """Accumulates the wall time of calls to one callable."""

    def __init__(self, function: Any):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class Recording(Timed):
    """`runtime.forward`, timed, keeping its last answer."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.last = super().__call__(*args, **kwargs)
        return self.last


class Replay:
    """Hands back the candidates a run recorded, pass by pass: the loop's own cost, without an engine."""

    def __init__(self, recorded: list[Candidates]):
        self.recorded = iter(recorded)

    def forward(self, *args: Any) -> Candidates:
        return next(self.recorded)

    def commit(self, *args: Any) -> None:
        pass


class TimedSession:
    """ONNX Runtime's session with its `run_with_iobinding` timed; everything else passes through."""

    def __init__(self, session: Any):
        self._session = session
        self.run_with_iobinding = Timed(session.run_with_iobinding)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def prompts(batch: int, prompt_length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)  # byte tokens and fillers of the random tokenizer
    return [rng.integers(1000, vocab_size, prompt_length).tolist() for _ in range(batch)]


def replay_loop(recorded: list[Candidates], spec: TokenSpec, params: GenerationParams, batch: int,
                prompt_length: int, vocab: int, seed: int) -> list[float]:
    """Seconds of each `step` when the engine's answers are the recorded ones (same prompts, same decisions)."""
    replay = Replay(recorded)
    live = [Sequence(p, params, spec, slot=i) for i, p in enumerate(prompts(batch, prompt_length, vocab, seed))]
    times = []
    while live:
        start = time.perf_counter()
        step(replay, live)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
        live = [s for s in live if not s.done]
    return times


def measure(runtime: OnnxRuntime, spec: TokenSpec, params: GenerationParams, batch: int, prompt_length: int,
            seed: int) -> dict[str, Any]:
    seqs = [Sequence(p, params, spec, slot=i)
            for i, p in enumerate(prompts(batch, prompt_length, runtime.contract.vocab_size, seed))]
    forward, commit = Recording(runtime.forward), Timed(runtime.commit)
    session = TimedSession(runtime.session)
    runtime.forward, runtime.commit, runtime.session = forward, commit, session  # type: ignore[method-assign]
    passes: list[dict[str, float]] = []
    recorded: list[Candidates] = []
    contract = runtime.contract
    try:
        live = list(seqs)
        while live:
            plans = [s.strategy.plan(s) for s in live]
            b, t, n = len(live), max(len(p.tokens) for p in plans), max(len(p.predict) for p in plans)
            prefill = any(s.phase == "prefill" for s in live)
            before = (forward.seconds, commit.seconds, session.run_with_iobinding.seconds)
            start = time.perf_counter()
            step(runtime, live)
            total = time.perf_counter() - start
            last = forward.last
            recorded.append(Candidates(last.tokens.copy(), last.logits.copy(), last.logsumexp.copy()))
            f, c, e = (now - then for now, then in zip(
                (forward.seconds, commit.seconds, session.run_with_iobinding.seconds), before))
            returned = contract.output_bytes(b, t, 0, n)
            passes.append({
                "prefill": prefill, "rows": b, "tokens": t, "positions": n,
                "engine_ms": e * 1e3, "runtime_host_ms": (f + c - e) * 1e3, "loop_ms": (total - f - c) * 1e3,
                "returned_bytes": returned["top_tokens"] + returned["top_logits"] + returned["logsumexp"],
                "contract_v1_bytes": b * t * contract.vocab_size * 4,
            })
            live = [s for s in live if not s.done]
    finally:
        del runtime.forward, runtime.commit
        runtime.session = session._session
    for p, seconds in zip(passes, replay_loop(recorded, spec, params, batch, prompt_length, contract.vocab_size, seed)):
        p["loop_replayed_ms"] = seconds * 1e3
    decode = [p for p in passes if not p["prefill"]]

    def median(key: str, rows: list[dict[str, Any]]) -> float:
        return statistics.median(r[key] for r in rows) if rows else float("nan")

    keys = ("engine_ms", "runtime_host_ms", "loop_ms", "loop_replayed_ms", "returned_bytes", "contract_v1_bytes")
    return {
        "passes": len(passes),
        "decode": {k: median(k, decode) for k in keys},
        "prefill": {k: median(k, [p for p in passes if p["prefill"]]) for k in keys},
        "tokens_per_row": statistics.mean(len(s.tokens) for s in seqs),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Per mode against the batch: the engine's time, the host's time (runtime and loop), the bytes returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (engine, host, returned) = plt.subplots(1, 3, figsize=(13, 4))
    modes = sorted({key.split("/")[0] for key in report["results"]}, key=list(MODES).index)
    for color, mode in zip(("C0", "C1", "C2"), modes):
        rows = sorted(((int(k.split("/")[1]), r["decode"]) for k, r in report["results"].items()
                       if k.split("/")[0] == mode))
        batches = [b for b, _ in rows]
        engine.plot(batches, [d["engine_ms"] for _, d in rows], "o-", color=color, label=mode)
        host.plot(batches, [d["runtime_host_ms"] for _, d in rows], "o--", color=color, label=f"{mode}: runtime host")
        host.plot(batches, [d["loop_replayed_ms"] for _, d in rows], "o-", color=color, label=f"{mode}: loop (replayed)")
        returned.plot(batches, [d["returned_bytes"] / 1e3 for _, d in rows], "o-", color=color, label=f"{mode}: v2")
        returned.plot(batches, [d["contract_v1_bytes"] / 1e3 for _, d in rows], "o:", color=color,
                      label=f"{mode}: v1 (full logits)")
    model = report["model"]
    engine.set(title=f"engine (ONNX Runtime, {model['layers']} layers, V {model['vocab_size']:,})", ylabel="ms per pass")
    host.set(title="host work per pass", ylabel="ms", yscale="log")
    returned.set(title="returned to the loop per pass", ylabel="kB", yscale="log")
    for ax in (engine, host, returned):
        ax.set(xlabel="batch")
        ax.set_xticks(sorted({int(key.split("/")[1]) for key in report["results"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=24, help="answer length per row (default 24)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoint and graph go (default: a "
                        "temporary directory; an existing export there is reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_step")
    parser.add_argument("--plot", action="store_true", help="only redraw bench_step.png from the bench_step.json in --out")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads((args.out / "bench_step.json").read_text()), args.out / "bench_step.png")
        print(f"wrote {args.out / 'bench_step.png'}", file=sys.stderr)
        return
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        checkpoint, artifact = work / "checkpoint", work / "onnx"
        config = real_scale_config(args.layers, args.hidden, args.intermediate)
        if not (artifact / "manifest.json").is_file():
            start = time.perf_counter()
            write_random_checkpoint(checkpoint, config)
            export_onnx(checkpoint, artifact, max_batch=max(batches), max_context=512, log=lambda _: None)
            print(f"checkpoint and export: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        config = json.loads((checkpoint / "config.json").read_text())
        # ONNX Runtime's threads sleep after each run instead of spinning: spinning, they would compete with the
        # loop for the same cores and inflate the host figures this measures
        runtime = OnnxRuntime(artifact, config, threads=args.threads, verify_files=False, spin=False)
        runtime.allocate(max(batches), args.prompt_length + args.max_tokens + 2 * config["block_size"])
        spec = TokenSpec.from_config(config)
        results: dict[str, Any] = {}
        for mode, params in MODES.items():
            for batch in batches:
                warm_up = dataclasses.replace(params, max_tokens=2)
                measure(runtime, spec, warm_up, batch, args.prompt_length, seed=1)
                r = measure(runtime, spec, dataclasses.replace(params, max_tokens=args.max_tokens), batch,
                            args.prompt_length, seed=2)
                results[f"{mode}/{batch}"] = r
                d = r["decode"]
                print(f"{mode:11s} batch {batch:2d}: engine {d['engine_ms']:8.2f} ms  runtime host "
                      f"{d['runtime_host_ms']:6.2f} ms  loop {d['loop_ms']:6.3f} ms (replayed "
                      f"{d['loop_replayed_ms']:6.3f} ms)  returned "
                      f"{d['returned_bytes'] / 1e3:8.1f} kB (contract v1: {d['contract_v1_bytes'] / 1e6:7.1f} MB)")

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads},
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "vocab_size": config["vocab_size"], "head_dim": config["head_dim"],
                  "kv_heads": config["num_key_value_heads"], "top_k": runtime.contract.top_k},
        "prompt_length": args.prompt_length,
        "max_tokens": args.max_tokens,
        "onnxruntime_spinning": False,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_step.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench_step.png")
    print(f"wrote {args.out / 'bench_step.json'} and bench_step.png", file=sys.stderr)


if __name__ == "__main__":
    main()
