#!/usr/bin/env python3
"""Grouped-query attention with keys and values expanded per query head (the former graph) against the query group
folded into the query axis (the graph now exported), on ONNX Runtime, at the real 3B layer shape.

Random weights in the 3B shape (hidden 3072, intermediate 9216, 32 query and 8 KV heads, head_dim 128), one layer
and a small vocabulary so the layer dominates; the same weights traced twice (`DiffusionLM(fold_query_groups=...)`)
and exported with the project's exporter at fp32. The two graphs take turns pass by pass on the same feeds: a
denoising pass over one 32-token block after a cache of `--cache` positions, at each batch. Medians; JSON to --out.
    python scripts/bench_gqa.py [--cache 512] [--batches 1,8] [--repeats 30]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.config import ModelConfig  # noqa: E402
from export.model import DiffusionLM  # noqa: E402
from export.onnx_export import write_onnx  # noqa: E402
from export.random_checkpoint import real_scale_config  # noqa: E402
from export.torch_export import contract_for, profile_for, sample_inputs, trace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_gqa")
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    batches = [int(b) for b in args.batches.split(",")]
    config = ModelConfig.from_dict(real_scale_config(1, 3072, 9216, vocab_size=4096))
    torch.manual_seed(0)
    folded = DiffusionLM(config, fold_query_groups=True).eval()
    with torch.no_grad():
        for p in folded.parameters():
            p.normal_(0.0, 0.02)
    expanded = DiffusionLM(config, fold_query_groups=False).eval()
    expanded.load_state_dict(folded.state_dict())
    contract = contract_for(folded, "fp32", profile_for(config, max(batches), 1024))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    with tempfile.TemporaryDirectory() as work:
        for name, model in (("expanded (before)", expanded), ("folded (now)", folded)):
            path = Path(work) / f"{name.split()[0]}.onnx"
            write_onnx(trace(model, contract), contract, path, 18)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results: dict[str, dict[str, float]] = {}
        for batch in batches:
            feed = sample_inputs(contract, batch, 32, args.cache, positions=32)
            feed["causal"][:] = False
            outputs = [s.run(None, feed) for s in sessions.values()]
            np.testing.assert_allclose(outputs[0][1], outputs[1][1], atol=1e-3)  # the same logits either way
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for i in range(args.repeats + 3):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    if i >= 3:
                        times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            results[f"batch {batch}"] = medians
            before, now = medians["expanded (before)"], medians["folded (now)"]
            print(f"batch {batch}: expanded {before:.2f} ms, folded {now:.2f} ms ({before / now:.2f}x)")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
              "shape": "3B layer: hidden 3072, 32/8 heads, head_dim 128, intermediate 9216, 1 layer, vocab 4096",
              "cache": args.cache, "block": 32, "results_ms": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gqa.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
