"""Quality harness: exact-match accuracy and tokens per forward of every mode on held-out problems.

    python -m export.evaluate [--checkpoint export/miniature] [--out artifacts/quality] [--count N]
        [--artifact DIR [--runtime onnxruntime]]   # score a built ONNX / FP8 / INT8 graph instead of eager PyTorch

For each task it decodes the held-out set with `ar`, `speculative`, `diffusion` at thresholds 0.5 to 0.99,
`diffusion` with a fixed number of steps per block, and `diffusion` with self-correction by re-masking at a few
thresholds (to compare with plain threshold decoding at matched tokens per forward). It reports exact match, tokens per forward (generated tokens up
to and including the first end token, divided by the forward passes after the prompt's prefill) and the
parallel-hallucination rate (problems `ar` gets right and the diffusion setting gets wrong); writes `quality.json`
and `quality.png`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dlm.refine import GenerationParams
from export.inprocess import InProcessGenerator, TextGeneration
from export.tasks import TASKS, Problem, held_out_set

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
STEPS = (1, 2, 4, 8, 16, 32)
REMASK = ((0.5, 0.5), (0.7, 0.5), (0.9, 0.5), (0.5, 0.8))  # (threshold, remask_threshold)
DEFAULT_COUNTS = {"addition": 500, "upper": 200}


@dataclass
class Score:
    task: str
    setting: str  # "ar", "speculative", "diffusion t=0.9", "diffusion steps=4"
    mode: str
    threshold: float | None
    steps: int | None
    accuracy: float
    tokens_per_forward: float
    hallucination_rate: float | None  # share of problems ar gets right and this setting wrong
    seconds: float
    remask_threshold: float | None = None  # last, so quality.json files written before it still load
    acceptance_length: float | None = None  # speculative: tokens each verifying pass commits (accepted + bonus)


def settings() -> list[tuple[str, GenerationParams]]:
    out = [("ar", GenerationParams(mode="ar")), ("speculative", GenerationParams(mode="speculative")),
           ("speculative without adapter", GenerationParams(mode="speculative", draft_adapter=False))]
    out += [(f"diffusion t={t}", GenerationParams(mode="diffusion", threshold=t)) for t in THRESHOLDS]
    out += [(f"diffusion steps={s}", GenerationParams(mode="diffusion", threshold=None, steps=s)) for s in STEPS]
    out += [(f"diffusion t={t} remask={r}", GenerationParams(mode="diffusion", threshold=t, remask_threshold=r))
            for t, r in REMASK]
    return out


def run_setting(
    generator: InProcessGenerator, problems: list[Problem], params: GenerationParams, batch: int
) -> list[TextGeneration]:
    max_tokens = max(len(generator.encode(p.answer)) for p in problems) + 8  # room to overshoot and be wrong
    params = GenerationParams(**{**asdict(params), "max_tokens": max_tokens})
    results: list[TextGeneration] = []
    for i in range(0, len(problems), batch):
        results += generator.generate([p.prompt for p in problems[i : i + batch]], params)
    return results


def evaluate(generator: InProcessGenerator, counts: dict[str, int], batch: int = 64) -> list[Score]:
    scores = []
    for task in TASKS:
        problems = held_out_set(task, counts[task])
        ar_correct: list[bool] | None = None
        for name, params in settings():
            results = run_setting(generator, problems, params, batch)
            correct = [r.text == p.answer for r, p in zip(results, problems)]
            if name == "ar":
                ar_correct = correct
            assert ar_correct is not None
            tokens = sum(r.num_tokens for r in results)
            forwards = sum(r.num_forwards - 1 for r in results)
            hallucinations = sum(a and not c for a, c in zip(ar_correct, correct)) / len(problems)
            seconds = sum({id(r.seconds): r.seconds for r in results}.values())
            verify_passes = sum(r.verify_passes for r in results)
            acceptance = sum(r.verified_tokens for r in results) / verify_passes if verify_passes else None
            score = Score(
                task, name, params.mode, params.threshold if params.mode == "diffusion" else None,
                params.steps if params.mode == "diffusion" and params.threshold is None else None,
                sum(correct) / len(problems), tokens / max(forwards, 1),
                hallucinations if params.mode == "diffusion" else None, seconds, params.remask_threshold,
                acceptance,
            )
            scores.append(score)
            print(
                f"{task:9s} {name:20s} accuracy {score.accuracy:6.1%}  tokens/forward {score.tokens_per_forward:5.2f}"
                + (f"  hallucination {score.hallucination_rate:5.1%}" if score.hallucination_rate is not None else "")
                + (f"  acceptance {score.acceptance_length:5.2f}" if score.acceptance_length is not None else ""),
                flush=True,
            )
    return scores


def plot(scores: list[Score], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for task in TASKS:
        rows = [s for s in scores if s.task == task]
        ar = next(s for s in rows if s.mode == "ar")
        by_threshold = [s for s in rows if s.threshold is not None and s.remask_threshold is None]
        by_steps = [s for s in rows if s.steps is not None]
        line = axes[0][0].plot([s.threshold for s in by_threshold], [s.accuracy for s in by_threshold], "o-", label=task)
        color = line[0].get_color()
        axes[0][0].axhline(ar.accuracy, color=color, ls="--", lw=0.8)
        axes[0][1].plot([s.threshold for s in by_threshold], [s.tokens_per_forward for s in by_threshold], "o-", color=color, label=task)
        axes[1][0].plot([s.steps for s in by_steps], [s.accuracy for s in by_steps], "o-", color=color, label=task)
        axes[1][0].axhline(ar.accuracy, color=color, ls="--", lw=0.8)
        axes[1][1].plot([s.steps for s in by_steps], [s.tokens_per_forward for s in by_steps], "o-", color=color, label=task)
    axes[0][0].set(title="diffusion accuracy vs threshold (dashed: ar)", xlabel="threshold", ylabel="exact match")
    axes[0][1].set(title="diffusion tokens per forward vs threshold", xlabel="threshold", ylabel="tokens / forward")
    axes[1][0].set(title="diffusion accuracy vs steps per block (dashed: ar)", xlabel="steps", ylabel="exact match", xscale="log")
    axes[1][1].set(title="diffusion tokens per forward vs steps per block", xlabel="steps", ylabel="tokens / forward", xscale="log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(scores: list[Score]) -> str:
    lines = [
        "| task | setting | exact match | tokens / forward | hallucination rate | acceptance length |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in scores:
        rate = "" if s.hallucination_rate is None else f"{s.hallucination_rate:.1%}"
        accepted = "" if s.acceptance_length is None else f"{s.acceptance_length:.2f}"
        lines.append(f"| {s.task} | {s.setting} | {s.accuracy:.1%} | {s.tokens_per_forward:.2f} | {rate} | {accepted} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "miniature")
    parser.add_argument("--out", type=Path, default=Path("artifacts/quality"))
    parser.add_argument("--count", type=int, help="problems per task (default: 500 addition, 200 upper)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--artifact", type=Path, help="decode with this built artifact instead of eager PyTorch")
    parser.add_argument("--runtime", default="auto", help="with --artifact: auto, onnxruntime, torch or tensorrt")
    args = parser.parse_args()
    counts = {t: args.count for t in TASKS} if args.count else DEFAULT_COUNTS
    generator = InProcessGenerator(args.checkpoint, artifact=args.artifact, runtime=args.runtime)
    scores = evaluate(generator, counts, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(args.checkpoint),
        "runtime": type(generator.runtime).__name__,
        "artifact": str(args.artifact) if args.artifact else None,
        "counts": counts,
        "scores": [asdict(s) for s in scores],
    }
    (args.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(scores, args.out / "quality.png")
    print(markdown_table(scores))
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.png'}")


if __name__ == "__main__":
    main()
