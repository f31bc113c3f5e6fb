"""A prompts file for `python -m client.audit` from the miniature's held-out problems (export/tasks.py), with their
answers as references: the file the README's audit figure was measured on (docs/audit/prompts.jsonl).

    python scripts/audit_prompts.py [--additions 150] [--uppers 50] [--out docs/audit/prompts.jsonl]

Additions are scored in turn by `number`, `exact` and an anchored `regex`; every fourth upper-casing is written as
chat messages (the miniature has no chat template, so a single user message is sent as it is).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.tasks import held_out_set  # noqa: E402


def lines(additions: int, uppers: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, problem in enumerate(held_out_set("addition", additions)):
        scorer = ("number", "exact", "regex")[i % 3]
        reference = rf"^\s*{re.escape(problem.answer)}\s*$" if scorer == "regex" else problem.answer
        out.append({"id": f"addition-{i}", "prompt": problem.prompt, "reference": reference, "scorer": scorer})
    for i, problem in enumerate(held_out_set("upper", uppers)):
        item: dict[str, Any] = {"id": f"upper-{i}"}
        if i % 4 == 3:
            item["messages"] = [{"role": "user", "content": problem.prompt}]
        else:
            item["prompt"] = problem.prompt
        out.append({**item, "reference": problem.answer, "scorer": "exact"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--additions", type=int, default=150)
    parser.add_argument("--uppers", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "audit" / "prompts.jsonl")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    items = lines(args.additions, args.uppers)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {len(items)} prompts to {args.out}")


if __name__ == "__main__":
    main()
