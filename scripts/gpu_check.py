#!/usr/bin/env python3
"""GPU check: the PyTorch runtime (`dlm.runtime.TorchRuntime`) on a CUDA device, figures as JSON.

- device copy bandwidth, from a large device-to-device copy (bytes read + bytes written per second);
- per-forward latency at batch 1 of the shipped miniature and of random weights in the real 3B shape, for a one-token
  causal pass and a one-block bidirectional pass over a cache, against the bandwidth floor (weight bytes ÷ copy
  bandwidth: the time just to read every weight once);
- on the miniature, tokens per forward, tokens/s and accuracy of each mode (ar, diffusion, speculative) on held-out
  problems, one request at a time and all of them batched;
- the same over a TensorRT fp16 plan of the miniature when TensorRT (and the export's dependencies) import.

Needs torch with CUDA and numpy; safetensors and tokenizers are used when present (a small reader of the miniature's
files stands in for each otherwise). Installs nothing and fails soft: a part that cannot run says why in the JSON.

    scripts/gpu_check.sh [--json PATH] [--dtypes bfloat16,float16] [--quick] [--skip-3b] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "model_repository" / "dlm" / "1")]  # `export` and `dlm` without installing
MINIATURE = ROOT / "export" / "miniature"
# The real 3B's sizes (DESIGN §2); ids and RoPE knobs as the family's config.json carries them.
REAL_3B = {
    "vocab_size": 131072, "hidden_size": 3072, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
    "mask_token_id": 100, "bos_token_id": 1, "eos_token_id": 11, "pad_token_id": 0, "block_size": 32,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                        "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
}
MODES = ("ar", "diffusion", "speculative")
OPTIONAL = ("numpy", "safetensors", "tokenizers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "tensorrt")


def log(message: str) -> None:
    print(message, flush=True)


def soft(report: dict[str, Any], key: str, run: Callable[[], Any]) -> Any:
    """Run one part; on failure record why under `key` and go on."""
    try:
        report[key] = run()
    except Exception as e:  # noqa: BLE001 - any failure of one part must not stop the others
        report[key] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{key}: skipped, {type(e).__name__}: {e}")
        if os.environ.get("GPU_CHECK_DEBUG"):
            traceback.print_exc()
    return report[key]


def synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(torch: Any, device: Any, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds per call, each call synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(torch, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(torch, device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(torch: Any, device: Any, quick: bool) -> dict[str, Any]:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 << 30
    size = min(2 << 30, free // 8) if device.type == "cuda" else 256 << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = timed(torch, device, lambda: dst.copy_(src), 3, 5 if quick else 20)
    best = min(times)
    del src, dst
    result = {"bytes_copied": size, "median_s": statistics.median(times), "bytes_per_s": 2 * size / best}
    log(f"device copy: {size / 2**30:.2f} GiB in {best * 1e3:.3f} ms → {result['bytes_per_s'] / 1e12:.2f} TB/s "
        f"(read + write)")
    return result


class CharTokenizer:
    """Stands in for `tokenizers` on the miniature's tokenizer.json: one token per character (its `Split` on every
    character with a `WordLevel` vocabulary) and the template's leading special token."""

    def __init__(self, path: Path):
        data = json.loads(path.read_text())
        if data["model"]["type"] != "WordLevel":
            raise RuntimeError(f"{path}: only the character-level WordLevel tokenizer is read without `tokenizers`")
        self.vocab = data["model"]["vocab"]
        self.unk = self.vocab[data["model"]["unk_token"]]
        template = (data.get("post_processor") or {}).get("single", [])
        self.prefix = [self.vocab[t["SpecialToken"]["id"]] for t in template if "SpecialToken" in t][:1]

    def encode(self, text: str) -> list[int]:
        return self.prefix + [self.vocab.get(c, self.unk) for c in text]


def read_safetensors(path: Path, torch: Any) -> dict[str, Any]:
    """Stands in for `safetensors`: an 8-byte header length, a JSON header, then the raw tensors."""
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(blob[base + begin : base + end]), dtype=dtypes[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def load_miniature(torch: Any, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, config) of the shipped miniature, through export.checkpoint when its imports are there."""
    config = json.loads((MINIATURE / "config.json").read_text())
    try:
        from export.checkpoint import load_checkpoint, load_tokenizer

        return load_checkpoint(MINIATURE, dtype=dtype), load_tokenizer(MINIATURE), config
    except ImportError as e:
        log(f"miniature: {e}; reading its files without safetensors/tokenizers")
    from export.config import ModelConfig
    from export.model import DiffusionLM

    model = DiffusionLM(ModelConfig.from_dict(config))
    model.load_state_dict({k: v.to(dtype) for k, v in read_safetensors(MINIATURE / "model.safetensors", torch).items()})
    tokenizer = CharTokenizer(MINIATURE / "tokenizer.json")
    return model.to(dtype).eval(), tokenizer, config


def random_3b(torch: Any, dtype: Any, device: Any) -> tuple[Any, None, dict[str, Any]]:
    """(model, no tokenizer, config): the 3B shape with random weights, created on the device (no host copy of
    15 GB of fp32)."""
    from export.config import ModelConfig
    from export.model import DiffusionLM

    config = {"architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **REAL_3B}
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffusionLM(ModelConfig.from_dict(config))
    return model.to(dtype).eval(), None, config


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward_latency(torch: Any, device: Any, runtime: Any, config: dict[str, Any], weights: int, bandwidth: float,
                    cache: int, quick: bool) -> dict[str, Any]:
    """Batch-1 latency of `runtime.forward` (host inputs in, the candidates back on the host, as serving runs it):
    one causal token after `cache` positions (ar decoding, speculative verification) and one bidirectional block
    (a diffusion step)."""
    import numpy as np

    block = int(config["block_size"])
    runtime.allocate(1, cache + block)
    floor = weights / bandwidth
    result: dict[str, Any] = {"weight_bytes": weights, "bandwidth_floor_s": floor, "cache_positions": cache}
    rng = np.random.default_rng(0)
    for name, tokens, causal in (("causal_1_token", 1, True), (f"bidirectional_{block}_tokens", block, False)):
        ids = rng.integers(5, int(config["vocab_size"]), (1, tokens))
        predict = np.array([[tokens - 1]]) if causal else np.arange(tokens)[None]
        args = (np.array([0]), ids, cache + np.arange(tokens)[None], np.ones((1, tokens), dtype=np.int64),
                np.array([cache]), np.array([causal]), predict)
        times = timed(torch, device, lambda: runtime.forward(*args), 3, 10 if quick else 50)
        median = statistics.median(times)
        result[name] = {"median_s": median, "p10_s": sorted(times)[len(times) // 10], "times_floor": median / floor}
        log(f"  {name:26s} {median * 1e3:8.3f} ms  = {median / floor:5.1f} × the bandwidth floor "
            f"({floor * 1e3:.3f} ms for {weights / 2**20:.1f} MiB)")
    return result


def modes(runtime: Any, encoder: "Encoder", config: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Tokens per forward, tokens/s and exact-match accuracy of each mode on held-out problems of every task."""
    from dlm.refine import GenerationParams, TokenSpec, generate
    from export.tasks import TASKS, held_out_set

    spec = TokenSpec.from_config(config)
    problems = [p for task in TASKS for p in held_out_set(task, 3 if quick else 8)]
    prompts = [encoder.encode(p.prompt) for p in problems]
    answers = [encoder.encode(p.answer)[len(encoder.encode("")):] for p in problems]  # without the template's <s>
    result: dict[str, Any] = {"problems": len(problems)}
    for mode in MODES:
        params = GenerationParams(mode=mode, max_tokens=48)
        generate(runtime, prompts[:2], params, spec)  # warm-up
        row: dict[str, Any] = {}
        for batching, groups in (("batch_1", [[p] for p in prompts]), ("batched", [prompts])):
            start = time.perf_counter()
            results = [r for group in groups for r in generate(runtime, group, params, spec)]
            seconds = time.perf_counter() - start
            tokens = sum(r.num_tokens for r in results)
            forwards = sum(r.num_forwards - 1 for r in results)  # after the prefill, as the quality harness counts
            correct = sum(list(r.tokens) == answer for r, answer in zip(results, answers))
            row[batching] = {"tokens": tokens, "forwards_after_prefill": forwards,
                             "tokens_per_forward": tokens / max(forwards, 1), "tokens_per_s": tokens / seconds,
                             "seconds": seconds, "accuracy": correct / len(problems)}
        result[mode] = row
        b1, bn = row["batch_1"], row["batched"]
        log(f"  {mode:11s} tokens/forward {b1['tokens_per_forward']:5.2f}  tokens/s {b1['tokens_per_s']:8.1f} "
            f"(batch 1), {bn['tokens_per_s']:8.1f} (batch {len(prompts)})  accuracy {b1['accuracy']:.0%}")
    return result


class Encoder:
    """`encode(text) -> ids` over `tokenizers.Tokenizer` and the stand-in alike."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        out = self.tokenizer.encode(text)
        return list(out.ids) if hasattr(out, "ids") else list(out)


def check_torch_model(torch: Any, device: Any, name: str, build: Callable[[], tuple[Any, Any, dict[str, Any]]],
                      bandwidth: float, cache: int, quick: bool, with_modes: bool) -> dict[str, Any]:
    from dlm.runtime import CacheLayout, TorchRuntime

    model, tokenizer, config = build()
    model = model.to(device)
    runtime = TorchRuntime(model, CacheLayout.from_config(config), device=str(device))
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, {model.dtype}")
    result: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch.")}
    result["latency_batch_1"] = forward_latency(torch, device, runtime, config, weight_bytes(model), bandwidth,
                                                cache, quick)
    if with_modes:
        result["modes"] = modes(runtime, Encoder(tokenizer), config, quick)
    del runtime, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def tensorrt_path(torch: Any, device: Any, bandwidth: float, cache: int, quick: bool) -> dict[str, Any]:
    """Export the miniature to fp16 ONNX, build a TensorRT fp16 plan, and run the same latency and mode figures."""
    missing = [m for m in ("tensorrt", "onnx", "onnxruntime", "onnxscript", "polygraphy", "safetensors", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        log(f"  skipped: not importable here: {', '.join(missing)}")
        return {"skipped": f"not importable here: {', '.join(missing)}"}
    from dlm.runtime import TensorRTRuntime
    from export.checkpoint import load_tokenizer
    from export.engine import build_engine
    from export.onnx_export import export_onnx

    config = json.loads((MINIATURE / "config.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        export_onnx(MINIATURE, Path(work) / "onnx", precision="fp16", max_batch=16, max_context=1024, log=log)
        entry = build_engine(Path(work) / "onnx" / "model.onnx", "fp16", Path(work) / "plan", log=log)
        runtime = TensorRTRuntime(Path(work) / "plan", config, device=str(device))
        result = {"tensorrt_version": entry["tensorrt_version"]}
        plan_bytes = (Path(work) / "plan" / "model.plan").stat().st_size  # its fp16 weights, and a little more
        result["latency_batch_1"] = forward_latency(torch, device, runtime, config, plan_bytes, bandwidth, cache, quick)
        result["modes"] = modes(runtime, Encoder(load_tokenizer(MINIATURE)), config, quick)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    out = os.environ.get("OUT")
    default_json = Path(out) / "gpu_check.json" if out else ROOT / "artifacts" / "gpu_check.json"
    parser.add_argument("--json", type=Path, default=default_json, help=f"figures file (default {default_json})")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="model dtypes to time (default bfloat16,float16)")
    parser.add_argument("--cache", type=int, default=512, help="cache positions behind the timed passes (default 512)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and problems (a smoke run)")
    parser.add_argument("--skip-3b", action="store_true", help="leave out the random 3B-shape model")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only to try the script)")
    args = parser.parse_args()

    report: dict[str, Any] = {"python": platform.python_version(), "argv": sys.argv[1:],
                              "imports": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}}
    try:
        import torch
    except ImportError:
        report["error"] = "torch is not importable: this check needs PyTorch with CUDA"
        return finish(report, args.json, 1)
    report["torch"] = torch.__version__
    report["cuda"] = torch.version.cuda
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report["error"] = "torch sees no CUDA device"
        return finish(report, args.json, 1)
    if device.type == "cuda":
        report["gpu"] = {"name": torch.cuda.get_device_name(device),
                         "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                         "memory_bytes": torch.cuda.get_device_properties(device).total_memory}
        log(f"{report['gpu']['name']} (compute capability {report['gpu']['compute_capability']}), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}")
    log("imports: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in report["imports"].items()))
    if not report["imports"]["numpy"]:
        report["error"] = "numpy is not importable: the runtime and the decoding loop need it"
        return finish(report, args.json, 1)

    bandwidth = soft(report, "copy_bandwidth", lambda: copy_bandwidth(torch, device, args.quick))
    bandwidth = bandwidth.get("bytes_per_s") or float("nan")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        entry = report.setdefault(dtype_name, {})
        first = dtype_name == args.dtypes.split(",")[0]
        soft(entry, "miniature", lambda: check_torch_model(
            torch, device, f"miniature {dtype_name}", lambda: load_miniature(torch, dtype), bandwidth, args.cache,
            args.quick, with_modes=first))
        if not args.skip_3b:
            soft(entry, "random_3b", lambda: check_torch_model(
                torch, device, f"random 3B shape {dtype_name}", lambda: random_3b(torch, dtype, device), bandwidth,
                args.cache, args.quick, with_modes=False))
    if device.type == "cuda":
        log("TensorRT path:")
        soft(report, "tensorrt", lambda: tensorrt_path(torch, device, bandwidth, args.cache, args.quick))
    return finish(report, args.json, 0)


def finish(report: dict[str, Any], path: Path, code: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if "error" in report:
        log(f"error: {report['error']}")
    log(f"figures written to {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
