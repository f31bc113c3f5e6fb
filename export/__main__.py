"""`python -m export ...`: turn a checkpoint into deployable artifacts (DESIGN §5a).

  onnx          checkpoint → validated model.onnx (+ model.pt2 with --torch-export) + manifest
  torch-export  checkpoint → model.pt2 (torch.export program for the PyTorch runtime) + manifest
  quantize      model.onnx → FP8 / INT8 Q/DQ model.onnx + manifest (NVIDIA ModelOpt, calibrated on real prompts)
  engine        model.onnx → TensorRT model.plan + manifest (GPU host with TensorRT)
  repository    checkpoint → a Triton model repository that serves it (artifact, tokenizer, chat template,
                config.pbtxt), checked to load before the command returns
"""

from __future__ import annotations

import argparse
import sys


def add_limits(parser: argparse.ArgumentParser, max_batch: int | None = None) -> None:
    from dlm.contract import DEFAULT_TOP_K
    from export.torch_export import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT

    parser.add_argument("--checkpoint", required=True, help="HuggingFace-format checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for the artifact and its manifest.json")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="weights and KV cache dtype of the graph (default fp32, what ONNX Runtime on the CPU "
                             "runs; bf16, the checkpoints' own dtype, and fp16 are for TensorRT on a GPU); norms, "
                             "attention softmax and the selection stay in fp32")
    max_batch = max_batch or DEFAULT_MAX_BATCH
    parser.add_argument("--max-batch", type=int, default=max_batch, help=f"most rows in one pass (default {max_batch})")
    parser.add_argument("--max-context", type=int, default=None,
                        help=f"most positions per sequence: prompt + answer + one block "
                             f"(default min(max_position_embeddings, {DEFAULT_MAX_CONTEXT}))")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="most new tokens in one pass, i.e. the longest prompt prefill (default --max-context)")
    parser.add_argument("--max-block", type=int, default=None,
                        help="longest block a request may use, i.e. most positions one pass predicts from "
                             "(default twice the checkpoint's block_size)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"candidates the graph returns per predicted position, at least 20 "
                             f"(default {DEFAULT_TOP_K}); sampling draws among them")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--draft-adapter", default="auto", metavar="DIR",
                         help="draft-only LoRA (PEFT folder) for self-speculation's drafting rows; default: the "
                              "checkpoint's linear_spec_lora/ when there is one. The graph then takes `draft [B]`")
    adapter.add_argument("--no-draft-adapter", dest="draft_adapter", action="store_const", const=None,
                         help="build without the draft adapter even when the checkpoint has one")


STRUCTURED_HELP = ("engine contract version 3: the graph also takes token_bitmask [B, N, ceil(V/32)] int32, the "
                   "allowed tokens per position, applied before the top-K and the log-sum-exp (structured outputs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser("onnx", help="checkpoint → validated ONNX graph + manifest")
    add_limits(onnx)
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    onnx.add_argument("--tolerance", type=float, default=None,
                      help="largest absolute logit difference ONNX Runtime may show against PyTorch "
                           "(default 1e-3 for fp32, 0.1 for fp16); for bf16, the largest mean difference of the "
                           "best candidates' probabilities against fp32 on decoded prompts (default 0.05)")
    onnx.add_argument("--torch-export", action="store_true", help="also write model.pt2 from the same trace")
    onnx.add_argument("--structured", action="store_true", help=STRUCTURED_HELP)

    repository = commands.add_parser(
        "repository", help="checkpoint → a Triton model repository that serves it, checked to load")
    add_limits(repository, max_batch=16)  # config.pbtxt's max_live: 16 slots
    repository.add_argument("--structured", action="store_true", help=STRUCTURED_HELP)
    repository.description = ("--out is the repository folder (it gets dlm/config.pbtxt and dlm/1/); the artifact "
                              "is the ONNX graph (build a TensorRT plan from dlm/1/engine/model.onnx on a GPU host)")

    torch_export = commands.add_parser("torch-export", help="checkpoint → torch.export program model.pt2 + manifest")
    add_limits(torch_export)
    torch_export.add_argument("--structured", action="store_true", help=STRUCTURED_HELP)

    from export.quantize import DEFAULT_CALIBRATION_SIZE

    quantize = commands.add_parser("quantize", help="ONNX graph → FP8 / INT8 Q/DQ graph + manifest (NVIDIA ModelOpt)")
    quantize.add_argument("--onnx", required=True, help="fp32 or fp16 model.onnx written by `onnx`")
    quantize.add_argument("--precision", choices=["fp8", "int8"], required=True)
    quantize.add_argument("--out", required=True, help="directory for the Q/DQ model.onnx and its manifest.json")
    quantize.add_argument("--checkpoint", default=None,
                          help="checkpoint whose tokenizer encodes the calibration prompts "
                               "(default: the one the graph's manifest names)")
    quantize.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION_SIZE,
                          help=f"calibration prompts, a prefill and a denoising pass each "
                               f"(default {DEFAULT_CALIBRATION_SIZE})")
    quantize.add_argument("--calibration-method", choices=["entropy", "max"], default=None,
                          help="activation range calibration (default max for int8, entropy for fp8)")
    quantize.add_argument("--high-precision", choices=["fp32", "fp16"], default=None,
                          help="dtype of what stays unquantized (default: the source graph's precision; "
                               "fp16 is what a TensorRT FP8 engine wants)")

    engine = commands.add_parser("engine", help="ONNX graph → TensorRT plan + manifest (needs TensorRT and a GPU)")
    engine.add_argument("--onnx", required=True, help="model.onnx written by `onnx` or `quantize`")
    engine.add_argument("--precision", choices=["fp16", "bf16", "fp8"], required=True,
                        help="strongly typed: from an fp16, bf16 or FP8 Q/DQ graph")
    engine.add_argument("--out", required=True, help="directory for model.plan and its manifest.json")
    engine.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 (default 3)")
    engine.add_argument("--timing-cache", default=None, help="timing cache file (default OUT/timing.cache)")
    engine.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit in GiB")
    engine.add_argument("--allow-fp32-cache", action="store_true",
                        help="build from a graph whose KV cache is float32 (refused by default: twice the memory)")

    args = parser.parse_args(argv)
    from dlm.artifact import ArtifactError
    from dlm.runtime import RuntimeUnavailable
    from export.engine import EngineError
    from export.onnx_export import ExportError
    from export.quantize import QuantizeError

    try:
        if args.command == "onnx":
            from export.onnx_export import export_onnx

            export_onnx(args.checkpoint, args.out, precision=args.precision, opset=args.opset,
                        max_batch=args.max_batch, max_context=args.max_context, max_tokens=args.max_tokens,
                        max_block=args.max_block, top_k=args.top_k, draft_adapter=args.draft_adapter,
                        tolerance=args.tolerance, torch_export=args.torch_export, structured=args.structured)
        elif args.command == "repository":
            from export.repository import build_repository

            build_repository(args.checkpoint, args.out, precision=args.precision, max_batch=args.max_batch,
                             max_context=args.max_context, max_tokens=args.max_tokens, max_block=args.max_block,
                             top_k=args.top_k, draft_adapter=args.draft_adapter, structured=args.structured)
        elif args.command == "torch-export":
            from export.torch_export import export_torch

            path = export_torch(args.checkpoint, args.out, precision=args.precision, max_batch=args.max_batch,
                                max_context=args.max_context, max_tokens=args.max_tokens,
                                max_block=args.max_block, top_k=args.top_k, draft_adapter=args.draft_adapter,
                                structured=args.structured)
            print(f"wrote {path}")
        elif args.command == "quantize":
            from export.quantize import quantize_onnx

            quantize_onnx(args.onnx, args.precision, args.out, checkpoint=args.checkpoint,
                          calibration_size=args.calibration_size, calibration_method=args.calibration_method,
                          high_precision=args.high_precision)
        else:
            from export.engine import build_engine

            build_engine(args.onnx, args.precision, args.out, opt_level=args.opt_level,
                         timing_cache=args.timing_cache, workspace_gib=args.workspace_gib,
                         allow_fp32_cache=args.allow_fp32_cache)
    except (ArtifactError, EngineError, ExportError, QuantizeError, RuntimeUnavailable, ValueError,
            MemoryError) as e:  # AdapterError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
