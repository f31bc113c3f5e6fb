#!/usr/bin/env python3
"""Per-forward time of eager PyTorch, ONNX Runtime fp32, int8 and fp8 on the miniature, side by side in one run.

The timed pass is a diffusion step: one bidirectional block (default 32 tokens) over a cache (default 128 positions),
at batch 1 and 8, through each runtime's `forward` as the decoding loop calls it. The runtimes take turns call by call,
so a change in machine load touches all of them alike; the figure is the median, and the speed-up is eager PyTorch's
median over the runtime's. Missing ONNX graphs are built first (int8/fp8 need the `modelopt` extra) and reused while
their manifest matches the checkpoint.

    python scripts/bench_runtimes.py [--checkpoint export/miniature] [--artifacts artifacts/bench] [--repeats 200]
        [--threads N] [--batches 1,8] [--block 32] [--cache 128] [--json artifacts/bench/bench_runtimes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

# The runtimes take turns call by call, so no thread pool may keep spinning after its call and steal the cores from
# the next runtime's: torch's OpenMP threads sleep at once (set before torch loads), ONNX Runtime's too (spin=False).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from dlm.artifact import ArtifactError
from dlm.runtime import CacheLayout, OnnxRuntime, RuntimeUnavailable, TorchRuntime
from export.checkpoint import load_checkpoint
from export.manifest import check, checkpoint_sha256

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ("fp32", "int8", "fp8")


def ensure_graph(precision: str, checkpoint: Path, artifacts: Path, max_batch: int, max_context: int) -> Path:
    """The directory of the `precision` graph, built unless one for this checkpoint is already there."""
    directory = artifacts / precision
    try:
        entry = check(directory, "onnx", checkpoint).entry
        profile = entry["contract"]["profile"]
        if profile["batch"][2] >= max_batch and profile["past_plus_tokens"][2] >= max_context:
            return directory
    except ArtifactError:
        pass
    print(f"building the {precision} graph in {directory}", flush=True)
    if precision == "fp32":
        from export.onnx_export import export_onnx

        export_onnx(checkpoint, directory, max_batch=max_batch, max_context=max_context)
    else:
        from export.quantize import quantize_onnx

        ensure_graph("fp32", checkpoint, artifacts, max_batch, max_context)
        quantize_onnx(artifacts / "fp32" / "model.onnx", precision, directory, checkpoint=checkpoint)
    return directory


def pass_inputs(batch: int, block: int, cache: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """`forward` arguments of one bidirectional block pass over `cache` cached positions in every row."""
    rng = np.random.default_rng(seed)
    return (
        np.arange(batch),
        rng.integers(5, vocab, (batch, block)),
        np.broadcast_to(cache + np.arange(block), (batch, block)).copy(),
        np.ones((batch, block), dtype=np.int64),
        np.full(batch, cache),
        np.zeros(batch, dtype=bool),
        np.broadcast_to(np.arange(block), (batch, block)).copy(),  # a denoising pass predicts from its whole block
    )


def bench(runtimes: dict[str, Any], args: tuple[np.ndarray, ...], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per `forward`, the runtimes taking turns."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for i in range(warmup + repeats):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            runtime.forward(*args)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "export" / "miniature")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts" / "bench",
                        help="where the fp32/, int8/ and fp8/ graphs are built and reused")
    parser.add_argument("--repeats", type=int, default=200, help="timed passes per runtime and batch (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op threads of torch and ONNX Runtime alike (default: every core)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--cache", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="default ARTIFACTS/bench_runtimes.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    config = json.loads((args.checkpoint / "config.json").read_text())
    context = args.cache + args.block

    runtimes: dict[str, Any] = {}
    model = load_checkpoint(args.checkpoint, dtype="float32").eval()
    runtimes["torch eager fp32"] = TorchRuntime(model, CacheLayout.from_config(config))
    skipped = {}
    for precision in GRAPHS:
        try:
            directory = ensure_graph(precision, args.checkpoint, args.artifacts, max(batches), context)
            runtimes[f"onnxruntime {precision}"] = OnnxRuntime(directory, config, threads=args.threads, spin=False)
        except RuntimeUnavailable as e:
            skipped[f"onnxruntime {precision}"] = str(e)
            print(f"onnxruntime {precision}: skipped, {e}")

    results: list[dict[str, Any]] = []
    for batch in batches:
        for runtime in runtimes.values():
            runtime.allocate(batch, context)
        times = bench(runtimes, pass_inputs(batch, args.block, args.cache, config["vocab_size"]), args.repeats,
                      args.warmup)
        eager = statistics.median(times["torch eager fp32"])
        for name, samples in times.items():
            ordered = sorted(samples)
            median = statistics.median(samples)
            results.append({"batch": batch, "runtime": name, "median_s": median,
                            "p10_s": ordered[len(ordered) // 10], "p90_s": ordered[(9 * len(ordered)) // 10],
                            "speedup_over_eager": eager / median})

    print(f"\nper-forward time, bidirectional block of {args.block} over a {args.cache}-token cache, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'batch':>5}  {'runtime':20s} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}  speed-up over eager")
    for r in results:
        print(f"{r['batch']:5d}  {r['runtime']:20s} {r['median_s'] * 1e3:10.3f} {r['p10_s'] * 1e3:8.3f} "
              f"{r['p90_s'] * 1e3:8.3f}  {r['speedup_over_eager']:6.2f}×")
    report = {
        "checkpoint": str(args.checkpoint), "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
        "pass": {"block": args.block, "cache": args.cache, "causal": False},
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "skipped": skipped, "results": results,
    }
    path = args.json or args.artifacts / "bench_runtimes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
