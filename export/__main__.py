"""`python -m export ...`: turn a checkpoint into deployable artifacts (DESIGN §5a).

  onnx          checkpoint → validated model.onnx (+ model.pt2 with --torch-export) + manifest
  torch-export  checkpoint → model.pt2 (torch.export program for the PyTorch runtime) + manifest
  engine        model.onnx → TensorRT model.plan + manifest (GPU host with TensorRT)
"""

from __future__ import annotations

import argparse
import sys


def add_limits(parser: argparse.ArgumentParser) -> None:
    from export.torch_export import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT

    parser.add_argument("--checkpoint", required=True, help="HuggingFace-format checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for the artifact and its manifest.json")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="weights and KV cache dtype of the graph (default fp32, what the CPU runs)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"most rows in one pass (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-context", type=int, default=None,
                        help=f"most positions per sequence: prompt + answer + one block "
                             f"(default min(max_position_embeddings, {DEFAULT_MAX_CONTEXT}))")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="most new tokens in one pass, i.e. the longest prompt prefill (default --max-context)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser("onnx", help="checkpoint → validated ONNX graph + manifest")
    add_limits(onnx)
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    onnx.add_argument("--tolerance", type=float, default=None,
                      help="largest absolute logit difference ONNX Runtime may show against PyTorch "
                           "(default 1e-3 for fp32, 0.1 for fp16)")
    onnx.add_argument("--torch-export", action="store_true", help="also write model.pt2 from the same trace")

    torch_export = commands.add_parser("torch-export", help="checkpoint → torch.export program model.pt2 + manifest")
    add_limits(torch_export)

    engine = commands.add_parser("engine", help="ONNX graph → TensorRT plan + manifest (needs TensorRT and a GPU)")
    engine.add_argument("--onnx", required=True, help="model.onnx written by `onnx` or `quantize`")
    engine.add_argument("--precision", choices=["fp16", "fp8"], required=True)
    engine.add_argument("--out", required=True, help="directory for model.plan and its manifest.json")
    engine.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 (default 3)")
    engine.add_argument("--timing-cache", default=None, help="timing cache file (default OUT/timing.cache)")
    engine.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit in GiB")

    args = parser.parse_args(argv)
    from dlm.artifact import ArtifactError
    from dlm.runtime import RuntimeUnavailable
    from export.engine import EngineError
    from export.onnx_export import ExportError

    try:
        if args.command == "onnx":
            from export.onnx_export import export_onnx

            export_onnx(args.checkpoint, args.out, precision=args.precision, opset=args.opset,
                        max_batch=args.max_batch, max_context=args.max_context, max_tokens=args.max_tokens,
                        tolerance=args.tolerance, torch_export=args.torch_export)
        elif args.command == "torch-export":
            from export.torch_export import export_torch

            path = export_torch(args.checkpoint, args.out, precision=args.precision, max_batch=args.max_batch,
                                max_context=args.max_context, max_tokens=args.max_tokens)
            print(f"wrote {path}")
        else:
            from export.engine import build_engine

            build_engine(args.onnx, args.precision, args.out, opt_level=args.opt_level,
                         timing_cache=args.timing_cache, workspace_gib=args.workspace_gib)
    except (ArtifactError, EngineError, ExportError, RuntimeUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
