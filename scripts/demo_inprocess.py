#!/usr/bin/env python3
"""Generate with the shipped miniature in this process, in each mode, and print text, tokens per forward and time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.refine import GenerationParams  # noqa: E402
from export.inprocess import InProcessGenerator  # noqa: E402

PROMPTS = ["4821+377=", "upper:thequickbrownfoxjumpsoverthelazydogs=", "57+8="]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "export" / "miniature")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    generator = InProcessGenerator(args.checkpoint)
    print(f"miniature checkpoint: {args.checkpoint}")
    for prompt in args.prompts:
        print(f"\nprompt: {prompt}")
        for mode in ("ar", "diffusion", "speculative"):
            result = generator.generate([prompt], GenerationParams(mode=mode, max_tokens=args.max_tokens))[0]
            print(
                f"  {mode:11s} {result.text!r:50s} tokens/forward {result.tokens_per_forward:5.2f}  "
                f"forwards {result.num_forwards:3d}  {result.seconds * 1000:7.1f} ms"
            )


if __name__ == "__main__":
    main()
