#!/usr/bin/env python3
"""What the draft-only LoRA adds to a pass: the same random real-scale checkpoint exported twice, with a draft
adapter of the family's shape (rank 128, alpha 512, on every o_proj) and without, timed side by side on ONNX Runtime.

The checkpoint has the real vocabulary (131,072), head size and KV heads (`export/random_checkpoint.py`; default 2
layers, hidden 1024). For each batch size, passes of three kinds are timed, interleaved between the two graphs so
both see the same machine: a drafting pass (a bidirectional block of 32 predicting from 31 positions, every row
with `draft` set), a mixed pass (half the rows drafting, half verifying causally) and a verifying pass (`draft`
false everywhere: the LoRA's cost when it is off). Medians of `run_with_iobinding` over the repeats, and their
ratio to the graph without an adapter. JSON to --out. Usage:

    python scripts/bench_draft_adapter.py [--batches 1,16] [--repeats 30] [--out docs/bench_draft_adapter]
"""

from __future__ import annotations

import argparse
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.runtime import OnnxRuntime  # noqa: E402
from export.adapter import ADAPTER_DIR, save_adapter  # noqa: E402
from export.config import ModelConfig  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.random_checkpoint import real_scale_config, write_random_checkpoint  # noqa: E402

RANK, ALPHA = 128, 512.0  # the family's linear_spec_lora
BLOCK, PAST = 32, 96


def write_random_adapter(checkpoint: Path, rank: int, alpha: float) -> None:
    config = ModelConfig.from_file(checkpoint)
    generator = torch.Generator().manual_seed(0)
    inner = config.num_attention_heads * config.head_dim
    layers = range(config.num_hidden_layers)
    save_adapter(checkpoint / ADAPTER_DIR, [torch.randn(rank, inner, generator=generator) * 0.01 for _ in layers],
                 [torch.randn(config.hidden_size, rank, generator=generator) * 0.01 for _ in layers], rank, alpha)


def pass_args(batch: int, kind: str, vocab: int, seed: int) -> tuple[np.ndarray, ...]:
    """One pass of `kind` (draft, mixed, verify): a block of 32 over a cache of 96 on every row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, BLOCK))
    positions = PAST + np.tile(np.arange(BLOCK), (batch, 1))
    draft = {"draft": np.ones(batch, bool), "verify": np.zeros(batch, bool),
             "mixed": np.arange(batch) % 2 == 0}[kind]
    causal = ~draft
    predict = np.where(causal[:, None], np.arange(BLOCK)[None], np.minimum(np.arange(1, BLOCK + 1), BLOCK - 1)[None])
    return (np.arange(batch), ids, positions, np.ones((batch, BLOCK), np.int64), np.full(batch, PAST, np.int64),
            causal, predict.astype(np.int64), draft)


def engine_seconds(runtime: OnnxRuntime, args: tuple[Any, ...]) -> float:
    """`run_with_iobinding` alone (the cache gather and the host inputs excluded)."""
    session = runtime.session
    run = session.run_with_iobinding
    elapsed = 0.0

    def timed(*a: Any, **k: Any) -> Any:
        nonlocal elapsed
        start = time.perf_counter()
        try:
            return run(*a, **k)
        finally:
            elapsed += time.perf_counter() - start

    session.run_with_iobinding = timed
    try:
        runtime.forward(*args)
    finally:
        del session.run_with_iobinding
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoint and graphs go (default: a "
                        "temporary directory; existing exports there are reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_draft_adapter")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        checkpoint = work / "checkpoint"
        config = real_scale_config(args.layers, args.hidden, args.intermediate)
        graphs = {"without adapter": work / "plain", "with adapter": work / "adapter"}
        if not all((g / "manifest.json").is_file() for g in graphs.values()):
            start = time.perf_counter()
            write_random_checkpoint(checkpoint, config)
            write_random_adapter(checkpoint, RANK, ALPHA)
            for name, out in graphs.items():
                export_onnx(checkpoint, out, max_batch=max(batches), max_context=256, log=lambda _: None,
                            draft_adapter="auto" if name == "with adapter" else None)
            print(f"checkpoint and exports: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        config = json.loads((checkpoint / "config.json").read_text())
        runtimes = {name: OnnxRuntime(g, config, threads=args.threads, verify_files=False, spin=False)
                    for name, g in graphs.items()}
        for runtime in runtimes.values():
            runtime.allocate(max(batches), PAST + 2 * BLOCK)
        results: dict[str, Any] = {}
        for batch in batches:
            for kind in ("draft", "mixed", "verify"):
                times: dict[str, list[float]] = {name: [] for name in runtimes}
                for i in range(args.repeats + 3):
                    for name, runtime in runtimes.items():  # interleaved: both graphs see the same machine
                        seconds = engine_seconds(runtime, pass_args(batch, kind, config["vocab_size"], seed=i))
                        if i >= 3:  # the first passes warm up
                            times[name].append(seconds)
                medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                ratio = medians["with adapter"] / medians["without adapter"]
                results[f"{kind}/{batch}"] = {"engine_ms": medians, "ratio": ratio}
                print(f"batch {batch:2d} {kind:6s}: without {medians['without adapter']:8.2f} ms   with "
                      f"{medians['with adapter']:8.2f} ms   ratio {ratio:.3f}")

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads},
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "vocab_size": config["vocab_size"], "head_dim": config["head_dim"],
                  "heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"]},
        "adapter": {"rank": RANK, "alpha": ALPHA, "target_modules": ["o_proj"]},
        "pass": {"block": BLOCK, "cache": PAST},
        "repeats": args.repeats,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_draft_adapter.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_draft_adapter.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
