#!/usr/bin/env python3
"""Prefix caching (issue 24), in this process through the `Scheduler` Triton runs (dlm/scheduler.py) on ONNX Runtime,
with config.pbtxt's per-pass budget (`max_num_tokens`) and prefill chunk (`prefill_chunk`). Triton's own overhead
(gRPC, the Python stub) is left out: it adds the same to both sides of every comparison.

Two artifacts: the shipped miniature (the server's model_repository/dlm/1/engine/model.onnx, 1,024 positions) and a
random-weight checkpoint at the real vocabulary, head size and KV heads (export/random_checkpoint.py, 2 layers,
hidden 1024), exported here with `python -m export onnx --max-context N` (reused from --work when it is there).

(a) Time to first block (submission to the first committed block, what `dlm_time_to_first_block_seconds`
    records) of a request whose prompt shares a `--prefix` token prefix with the request before it, against the
    request before it, which shares nothing (its prefix is fresh random tokens): both are the prefix and a
    `--tail` of their own, the same lengths, the server's default decoding settings. Cold and warm alternate, a new
    prefix each repeat; medians over `--repeats`, side by side in one run. Prefixes that do not fit the artifact's
    context are skipped.
(b) A multi-turn chat: `--conversations` conversations of `--turns` turns over one system prompt, each turn's prompt
    the whole conversation so far (system prompt, every earlier user message and answer, separators standing for
    the chat template's) and a new user message. Run with prefix caching on and off: the prompt tokens prefilled
    (each request's prompt less its `cached_tokens`), the wall time, and whether every answer is the same.

    python scripts/bench_prefix.py [--artifact miniature real] [--prefix 500 1000 2000] [--repeats 7]
        [--turns 8] [--conversations 4] [--threads N] [--work DIR] [--out docs/bench_prefix]

Writes bench_prefix.json to --out and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inprocess_bench, beside this script

from dlm.planner import PassLimits  # noqa: E402
from dlm.refine import GenerationParams, TokenSpec  # noqa: E402
from dlm.runtime import OnnxRuntime  # noqa: E402
from dlm.scheduler import Job, Scheduler  # noqa: E402
from dlm.special_tokens import end_token_ids  # noqa: E402
from inprocess_bench import Done, export_once, machine, parameter, run_one, ttfb  # noqa: E402

VERSION = ROOT / "model_repository" / "dlm" / "1"
TARGETS = {"ttfb_ratio": 0.3, "ttfb_prefix": 1000, "chat_prefill_share": 0.25}  # issue 24



def defaults() -> GenerationParams:
    """The server's default decoding settings (config.pbtxt), as a request that sets none gets them."""
    threshold = parameter("threshold").strip()
    return GenerationParams(parameter("default_mode"), max_tokens=int(parameter("max_tokens")),
                            threshold=float(threshold) if threshold else None, steps=int(parameter("steps")))



@dataclass
class Artifact:
    name: str
    directory: Path
    config: dict[str, Any]
    spec: TokenSpec
    vocabulary: range  # ids random prompts are drawn from (no special token, no mask)


def miniature() -> Artifact:
    config = json.loads((VERSION / "tokenizer" / "config.json").read_text())
    spec = TokenSpec.from_config(config, end_token_ids(VERSION / "tokenizer"))
    return Artifact("miniature", VERSION / "engine", config, spec, range(20, int(config["vocab_size"])))


def real_vocabulary(work: Path, context: int) -> Artifact:
    """The random real-vocabulary checkpoint and its ONNX export (`python -m export onnx`), built once in `work`."""
    checkpoint, out = work / "checkpoint", work / f"onnx-{context}"
    if not (checkpoint / "config.json").is_file():
        from export.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(checkpoint)
    export_once(checkpoint, out, "--max-context", str(context), "--max-batch", "4")
    config = json.loads((checkpoint / "config.json").read_text())
    spec = TokenSpec.from_config(config, end_token_ids(checkpoint))
    return Artifact("real-vocabulary", out, config, spec, range(1000, int(config["vocab_size"])))


class Server:
    """What model.py builds over one artifact, without Triton."""

    def __init__(self, artifact: Artifact, threads: int | None, max_live: int):
        self.artifact = artifact
        spin = parameter("runtime_spin").strip().lower() in ("1", "true", "yes")
        self.runtime = OnnxRuntime(artifact.directory, artifact.config, threads=threads, spin=spin,
                                   verify_files=False)
        profile = self.runtime.contract.profile
        self.limits = PassLimits.from_profile(profile, int(parameter("max_num_tokens")), int(parameter("prefill_chunk")))
        self.max_live, self.context = min(max_live, profile.batch[2]), profile.max_context
        self.pad = int(artifact.config.get("pad_token_id") or 0)

    def scheduler(self, caching: bool = True) -> Scheduler:
        return Scheduler(self.runtime, self.artifact.spec, max_live=self.max_live, max_queue=64, context=self.context,
                         pad_token_id=self.pad, limits=self.limits, prefix_caching=caching)



def first_block(server: Server, prefix: int, tail: int, repeats: int, seed: int) -> dict[str, Any]:
    """Part (a) at one prefix length."""
    rng = random.Random(seed)
    vocabulary = server.artifact.vocabulary
    params = defaults()

    def tokens(n: int) -> list[int]:
        return [rng.choice(vocabulary) for _ in range(n)]

    scheduler = server.scheduler()
    cold, warm, cached = [], [], []
    try:
        run_one(scheduler, tokens(prefix + tail), params)  # warm-up
        for _ in range(repeats):
            shared = tokens(prefix)
            first = run_one(scheduler, shared + tokens(tail), params)  # nothing resident starts with `shared`
            second = run_one(scheduler, shared + tokens(tail), params)  # the slot the first left holds `shared`
            assert first.seq.cached_tokens is not None and second.seq.cached_tokens is not None
            cold.append(ttfb(first))
            warm.append(ttfb(second))
            cached.append((first.seq.cached_tokens, second.seq.cached_tokens))
    finally:
        scheduler.stop()
    cold_p50, warm_p50 = statistics.median(cold), statistics.median(warm)
    return {"artifact": server.artifact.name, "prefix_tokens": prefix, "tail_tokens": tail, "repeats": repeats,
            "cold_ms": [t * 1000 for t in cold], "warm_ms": [t * 1000 for t in warm],
            "cold_p50_ms": cold_p50 * 1000, "warm_p50_ms": warm_p50 * 1000, "ratio": warm_p50 / cold_p50,
            "cached_tokens_cold_max": max(c for c, _ in cached), "cached_tokens_warm_min": min(w for _, w in cached)}


def chat(server: Server, turns: int, conversations: int, system: int, user: int, max_tokens: int,
         seed: int) -> dict[str, Any]:
    """Part (b): the same conversations with prefix caching on and off."""
    rng = random.Random(seed)
    vocabulary = server.artifact.vocabulary
    system_prompt = [rng.choice(vocabulary) for _ in range(system)]
    messages = [[[rng.choice(vocabulary) for _ in range(user)] for _ in range(turns)] for _ in range(conversations)]
    end_turn, start_user, start_answer = [rng.choice(vocabulary) for _ in range(3)]  # the template's separators
    params = GenerationParams(defaults().mode, max_tokens=max_tokens, threshold=defaults().threshold,
                              steps=defaults().steps)
    runs: dict[str, Any] = {}
    for caching in (True, False):
        scheduler = server.scheduler(caching)
        histories = [list(system_prompt) for _ in range(conversations)]
        answers: list[list[int]] = []
        prompt_tokens = prefilled = 0
        start = time.perf_counter()
        try:
            for turn in range(turns):  # every conversation's next turn, at once
                prompts = [history + [start_user] + messages[c][turn] + [start_answer]
                           for c, history in enumerate(histories)]
                done = [Done() for _ in prompts]
                jobs = [scheduler.submit(p, params, d) for p, d in zip(prompts, done)]
                for d in done:
                    d.wait()
                for c, job in enumerate(jobs):
                    histories[c] = prompts[c] + job.seq.output + [end_turn]
                    answers.append(job.seq.output)
                    prompt_tokens += len(job.seq.prompt)
                    prefilled += len(job.seq.prompt) - (job.seq.cached_tokens or 0)
        finally:
            scheduler.stop()
        runs["on" if caching else "off"] = {"prompt_tokens": prompt_tokens, "prefilled_tokens": prefilled,
                                            "seconds": time.perf_counter() - start, "answers": answers}
    on, off = runs["on"], runs["off"]
    return {"artifact": server.artifact.name, "turns": turns, "conversations": conversations,
            "system_tokens": system, "user_tokens": user, "max_tokens": max_tokens, "mode": params.mode,
            "final_conversation_tokens": max(len(h) for h in histories),  # the last answer and separator too
            "prompt_tokens": off["prompt_tokens"], "prefilled_on": on["prefilled_tokens"],
            "prefilled_off": off["prefilled_tokens"], "prefill_share": on["prefilled_tokens"] / off["prefilled_tokens"],
            "seconds_on": on["seconds"], "seconds_off": off["seconds"],
            "same_answers": on["answers"] == off["answers"]}



def targets(rows: list[dict[str, Any]], chats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for a in rows:
        if a["prefix_tokens"] == TARGETS["ttfb_prefix"]:
            out.append({"target": f"first block, {a['prefix_tokens']}-token shared prefix ÷ nothing shared ≤ "
                                  f"{TARGETS['ttfb_ratio']:g} ({a['artifact']})",
                        "measured": a["ratio"], "met": a["ratio"] <= TARGETS["ttfb_ratio"]})
    for b in chats:
        out.append({"target": f"{b['turns']}-turn chat: tokens prefilled with reuse ÷ without ≤ "
                              f"{TARGETS['chat_prefill_share']:.0%} ({b['artifact']})",
                    "measured": b["prefill_share"], "met": b["prefill_share"] <= TARGETS["chat_prefill_share"]})
        out.append({"target": f"{b['turns']}-turn chat: the same answers with reuse on and off ({b['artifact']})",
                    "measured": float(b["same_answers"]), "met": b["same_answers"]})
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = ["| artifact | shared prefix | own tail | nothing shared p50 ms | prefix shared p50 ms | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in record["first_block"]:
        lines.append(f"| {a['artifact']} | {a['prefix_tokens']} | {a['tail_tokens']} | {a['cold_p50_ms']:.1f} | "
                     f"{a['warm_p50_ms']:.1f} | {a['ratio']:.3f} |")
    lines += ["", "| artifact | conversations × turns | prompt tokens | prefilled, reuse off | prefilled, reuse on "
              "| share | seconds off / on | same answers |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in record["chat"]:
        lines.append(f"| {b['artifact']} | {b['conversations']} × {b['turns']} | {b['prompt_tokens']} | "
                     f"{b['prefilled_off']} | {b['prefilled_on']} | {b['prefill_share']:.1%} | "
                     f"{b['seconds_off']:.1f} / {b['seconds_on']:.1f} | {'yes' if b['same_answers'] else '**no**'} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in record["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", nargs="+", choices=["miniature", "real"], default=["miniature", "real"])
    parser.add_argument("--prefix", type=int, nargs="+", default=[500, 1000, 2000], help="shared prefix lengths")
    parser.add_argument("--tail", type=int, default=32, help="each request's own tokens after the prefix")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--max-live", type=int, default=4, help="slots (at most the artifact's --max-batch)")
    parser.add_argument("--real-context", type=int, default=2304,
                        help="--max-context of the real-vocabulary export (the longest prefix, a tail and a block)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the real-vocabulary checkpoint and export go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_prefix")
    args = parser.parse_args(argv)

    rows, chats = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.artifact:
            artifact = miniature() if name == "miniature" else real_vocabulary(args.work or Path(scratch),
                                                                               args.real_context)
            server = Server(artifact, args.threads, args.max_live)
            block = artifact.spec.block_size
            for prefix in args.prefix:
                if prefix + args.tail + int(parameter("max_tokens")) + block > server.context:
                    print(f"{artifact.name}: a {prefix}-token prefix does not fit {server.context} positions; "
                          f"skipped", file=sys.stderr)
                    continue
                rows.append(first_block(server, prefix, args.tail, args.repeats, args.seed + prefix))
                print(f"{artifact.name} prefix {prefix}: {rows[-1]['cold_p50_ms']:.1f} ms -> "
                      f"{rows[-1]['warm_p50_ms']:.1f} ms", file=sys.stderr)
            # one block per answer; the system prompt as long as the last turn and its answer leave room for (at
            # most 400 tokens), so the conversation fits the context
            user, max_tokens = 16, block
            system = min(400, server.context - args.turns * (user + max_tokens + 3) - max_tokens - block)
            chats.append(chat(server, args.turns, args.conversations, system, user, max_tokens, args.seed))
            print(f"{artifact.name} chat: {chats[-1]['prefill_share']:.1%} of the prompt tokens prefilled",
                  file=sys.stderr)
    record = {
        "machine": machine(),
        "settings": {"max_num_tokens": int(parameter("max_num_tokens")),
                     "prefill_chunk": int(parameter("prefill_chunk")), "max_live": args.max_live,
                     "threads": args.threads, "defaults": {"mode": defaults().mode, "max_tokens": defaults().max_tokens,
                                                           "threshold": defaults().threshold},
                     "real_context": args.real_context, "seed": args.seed},
        "first_block": rows, "chat": chats,
        "targets": targets(rows, chats),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefix.json").write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
