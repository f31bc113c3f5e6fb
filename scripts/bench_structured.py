#!/usr/bin/env python3
"""The cost of a grammar constraint (structured outputs, issue 26), in this process through the `Scheduler` Triton
runs (dlm/scheduler.py) on ONNX Runtime, with config.pbtxt's settings (threshold 0.9, `max_num_tokens`,
`prefill_chunk`, ONNX Runtime's threads); prefix caching off, since the same prompts repeat in every row. Triton's own
overhead (gRPC, the Python stub) is left out: it adds the same to every row.

Two artifacts, each exported with `--structured` (engine contract version 3: the graph takes the allowed-token
bitmask) by `python -m export onnx` into --work, and reused from there:
- the shipped miniature (128 ids) with its draft adapter, the limits of the server's artifact but 4 rows;
- a random-weight checkpoint at the real vocabulary (131,072 ids, 4,096 bitmask words a position), head size and KV
  heads, 1 layer of hidden 256 (export/random_checkpoint.py): per-pass host costs that grow with the vocabulary,
  the grammar's bitmask among them, show there. No draft adapter: `speculative` drafts with the base weights.

For each mode (`ar`, `speculative`, `diffusion`) and each constraint: none, any JSON object
(`guided_decoding_guide_type` json) and a JSON schema (the 3-key schema tests/test_structured_decoding.py uses:
an integer 0-999, a boolean, an enum), the same prompts (held-out `addition` and `upper` problems; the miniature
was never trained on JSON), one request at a time, temperature 0 by default, `--max-tokens` each. Unconstrained
requests run on the version-2 artifact too (the miniature's shipped one; the real one exported without
`--structured`), which shows what the bitmask input costs a graph that is not constrained.

Per row: tokens per forward (`num_tokens / num_forwards`, as the server reports them), tokens/s (medians over
--repeats, all rows of a repeat side by side), each against the same mode unconstrained; the host time per pass in
the grammar, measured by wrapping (not changing) dlm's grammar steps: building the rows' allowed-token masks
(`Sequence.allowed_masks`) and constrained diffusion's commit (`BlockDiffusion._denoise_constrained`, which walks
the frontier and the forced tokens), with llguidance's mask computation (`Constraint.mask`) counted apart; and every
constrained output checked: accepted by a fresh matcher of its grammar (a complete answer, or a prefix of one at
max_tokens), and a complete answer that parses (and validates against the schema). Then each constrained output is
replayed through a fresh matcher alone, timing one `Constraint.mask` per token: the mask's cost with nothing else
on the cores (in the run, ONNX Runtime's spinning threads and other jobs share them).

    python scripts/bench_structured.py [--artifact miniature real] [--modes ar speculative diffusion]
        [--repeats 3] [--prompts 4] [--real-prompts 2] [--max-tokens 48] [--real-max-tokens 32] [--temperature 0]
        [--no-v2] [--no-spin] [--threads N] [--work build/bench_structured] [--out docs/bench_structured]
    python scripts/bench_structured.py --quick --work DIR --out DIR   # the miniature, 2 prompts, 1 repeat

Writes bench_structured.json to --out and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inprocess_bench, beside this script

import dlm.grammar as grammar_module  # noqa: E402
import dlm.refine as refine_module  # noqa: E402
from dlm.deployment import Deployment  # noqa: E402
from dlm.grammar import Compiler, Grammar  # noqa: E402
from dlm.refine import GenerationParams  # noqa: E402
from dlm.scheduler import Scheduler  # noqa: E402
from export.tasks import held_out_set  # noqa: E402
from inprocess_bench import deployment, export_once, machine, parameter, run_one, scheduler  # noqa: E402

VERSION = ROOT / "model_repository" / "dlm" / "1"
MODES = ("ar", "speculative", "diffusion")
# the 3-key schema of tests/test_structured_decoding.py ("the miniature's structured task")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sum", "ok", "tag"],
          "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                         "tag": {"enum": ["a", "bc"]}}}
# constraint name -> (guided_decoding_guide_type, guided_decoding_guide); None: unconstrained
GUIDES: dict[str, tuple[str, str] | None] = {"none": None, "json": ("json", ""),
                                             "schema": ("json_schema", json.dumps(SCHEMA))}
V2 = "none, version-2 graph"  # the unconstrained row on the artifact without the bitmask input
TARGETS = {"valid": 1.0, "diffusion_schema_tokens_per_forward": 2.0}  # issue 26
REAL_LAYERS, REAL_HIDDEN, REAL_INTERMEDIATE = 1, 256, 768


@dataclass
class Artifact:
    name: str
    structured: Path  # version 3
    plain: Path | None  # version 2 (None: not measured)
    tokenizer: Path | None  # None: the model repository's
    max_tokens: int
    prompts: int


def miniature_artifact(work: Path, max_tokens: int, prompts: int, v2: bool) -> Artifact:
    """The miniature exported as the server's artifact was (its manifest's command), with --structured and 4 rows."""
    shipped = VERSION / "engine"
    entry = json.loads((shipped / "manifest.json").read_text())["artifacts"]["model.onnx"]
    profile = entry["contract"]["profile"]
    structured = export_once(ROOT / "export" / "miniature", work / "miniature-structured", "--structured",
                             "--max-batch", "4", "--max-context", str(profile["past_plus_tokens"][2]),
                             "--max-tokens", str(profile["tokens"][2]), "--max-block", str(profile["positions"][2]),
                             "--draft-adapter", str(ROOT / "export" / "miniature" / "linear_spec_lora"))
    return Artifact("miniature", structured, shipped if v2 else None, None, max_tokens, prompts)


def real_artifact(work: Path, max_tokens: int, prompts: int, v2: bool) -> Artifact:
    """The random real-vocabulary checkpoint (written once into `work`) exported with and without --structured."""
    from export.random_checkpoint import real_scale_config, write_random_checkpoint

    checkpoint = work / f"checkpoint-{REAL_LAYERS}x{REAL_HIDDEN}"
    if not (checkpoint / "config.json").is_file():
        write_random_checkpoint(checkpoint, real_scale_config(num_hidden_layers=REAL_LAYERS, hidden_size=REAL_HIDDEN,
                                                              intermediate_size=REAL_INTERMEDIATE))
    limits = ("--max-context", "512", "--max-batch", "2")
    structured = export_once(checkpoint, work / f"real-{REAL_LAYERS}x{REAL_HIDDEN}-structured", "--structured",
                             *limits)
    plain = export_once(checkpoint, work / f"real-{REAL_LAYERS}x{REAL_HIDDEN}", *limits) if v2 else None
    return Artifact("real-vocabulary", structured, plain, checkpoint, max_tokens, prompts)


class GrammarClock:
    """Host time in the grammar, by wrapping dlm's grammar steps (restored on exit): the rows' allowed-token masks
    before a pass, constrained diffusion's commit after one, and llguidance's mask computation within both."""

    def __init__(self) -> None:
        self.seconds = self.mask_seconds = 0.0
        self.mask_calls = 0

    def reset(self) -> None:
        self.seconds = self.mask_seconds = 0.0
        self.mask_calls = 0

    def __enter__(self) -> "GrammarClock":
        sequence, diffusion, constraint = refine_module.Sequence, refine_module.BlockDiffusion, grammar_module.Constraint
        self._saved = (sequence.allowed_masks, diffusion.__dict__["_denoise_constrained"], constraint.mask)
        allowed_masks, denoise, mask = sequence.allowed_masks, diffusion._denoise_constrained, constraint.mask
        clock = self

        def timed_allowed_masks(seq: Any, plan: Any) -> Any:
            if seq.constraint is None:
                return allowed_masks(seq, plan)
            start = time.perf_counter()
            try:
                return allowed_masks(seq, plan)
            finally:
                clock.seconds += time.perf_counter() - start

        def timed_denoise(seq: Any, picks: Any) -> None:
            start = time.perf_counter()
            try:
                denoise(seq, picks)
            finally:
                clock.seconds += time.perf_counter() - start

        def timed_mask(this: Any) -> Any:
            start = time.perf_counter()
            try:
                return mask(this)
            finally:
                clock.mask_seconds += time.perf_counter() - start
                clock.mask_calls += 1

        setattr(sequence, "allowed_masks", timed_allowed_masks)
        setattr(diffusion, "_denoise_constrained", staticmethod(timed_denoise))
        setattr(constraint, "mask", timed_mask)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, saved in zip((refine_module.Sequence, refine_module.BlockDiffusion, grammar_module.Constraint),
                                      ("allowed_masks", "_denoise_constrained", "mask"), self._saved):
            setattr(owner, name, saved)


def check(grammar: Grammar, guide: str, text: str, tokens: list[int], finish: str | None) -> tuple[bool, bool]:
    """(accepted, parsed): the tokens are accepted by a fresh matcher of the grammar (complete when the answer
    ended with an end token, a prefix at max_tokens); the text is a complete answer that parses as a JSON object
    (and, under the schema, is valid against it)."""
    matcher = grammar.start().matcher
    accepted = all(matcher.consume_token(int(t)) for t in tokens) and not matcher.is_error()
    if finish == "eos":
        accepted = accepted and (matcher.is_stopped() or matcher.is_accepting())
    try:
        value = json.loads(text)
    except ValueError:
        return accepted, False
    return accepted, finish == "eos" and isinstance(value, dict) and (guide != "schema" or valid(value))


def valid(value: dict[str, Any]) -> bool:
    """`value` against SCHEMA (its three keys, no others, each of its type and range)."""
    return (set(value) == {"sum", "ok", "tag"} and type(value["sum"]) is int and 0 <= value["sum"] <= 999
            and type(value["ok"]) is bool and value["tag"] in ("a", "bc"))


def replay_masks(grammar: Grammar, outputs: list[list[int]]) -> list[float]:
    """Seconds of one `Constraint.mask` at every step of each output, through a fresh matcher with nothing else
    running."""
    times = []
    for tokens in outputs:
        constraint = grammar.start()
        for token in tokens:
            start = time.perf_counter()
            constraint.mask()
            times.append(time.perf_counter() - start)
            constraint.consume(int(token))
    return times


class Bench:
    """One artifact's deployments (version 3, and version 2 when measured), their schedulers and the compiled
    guides."""

    def __init__(self, artifact: Artifact, threads: int | None, spin: bool):
        overrides = {"max_live": "2", **({"runtime_threads": str(threads)} if threads else {}),
                     **({} if spin else {"runtime_spin": "false"})}
        self.artifact = artifact
        self.structured: Deployment = deployment(artifact.structured, artifact.tokenizer, **overrides)
        self.plain = deployment(artifact.plain, artifact.tokenizer, **overrides) if artifact.plain else None
        self.schedulers = {"structured": scheduler(self.structured, prefix_caching=False)}
        if self.plain is not None:
            self.schedulers["plain"] = scheduler(self.plain, prefix_caching=False)
        config = self.structured.model_config
        eos = config["eos_token_id"]
        start = time.perf_counter()
        self.compiler = Compiler(self.structured.codec, int(config["vocab_size"]),
                                 int(eos[0] if isinstance(eos, list) else eos), self.structured.spec.mask_token_id)
        self.compiler_seconds = time.perf_counter() - start
        self.grammars = {name: self.compiler.compile(*guide) for name, guide in GUIDES.items() if guide is not None}

    def stop(self) -> None:
        for s in self.schedulers.values():
            s.stop()

    def rows(self, modes: list[str]) -> Iterator[tuple[str, str, Scheduler, Grammar | None]]:
        """(mode, constraint, scheduler, grammar) of every row, in the order a repeat runs them."""
        for mode in modes:
            if "plain" in self.schedulers:
                yield mode, V2, self.schedulers["plain"], None
            for name in GUIDES:
                yield mode, name, self.schedulers["structured"], self.grammars.get(name)


def measure(bench: Bench, prompts: list[str], modes: list[str], repeats: int, temperature: float,
            seed: int) -> list[dict[str, Any]]:
    """Every row of one artifact, each repeat running all rows in turn (side by side)."""
    artifact, codec = bench.artifact, bench.structured.codec
    encoded = [codec.encode(p) for p in prompts]
    threshold = parameter("threshold").strip()
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    with GrammarClock() as clock:
        for mode, name, s, grammar in bench.rows(modes):  # warm-up: each runtime's first passes of each shape
            if name in ("none", V2):
                run_one(s, encoded[0], GenerationParams(mode, max_tokens=artifact.max_tokens))
        for repeat in range(repeats):
            for mode, name, s, grammar in bench.rows(modes):
                cell = cells.setdefault((mode, name), {"seconds": [], "tokens": [], "forwards": [], "grammar": [],
                                                       "mask": [], "mask_calls": [], "outputs": []})
                clock.reset()
                tokens = forwards = 0
                outputs = []
                start = time.perf_counter()
                for i, prompt in enumerate(encoded):
                    params = GenerationParams(mode, max_tokens=artifact.max_tokens,
                                              threshold=float(threshold) if threshold else None,
                                              steps=int(parameter("steps")), temperature=temperature,
                                              seed=seed + 1000 * repeat + i, guide=grammar)
                    job = run_one(s, prompt, params)
                    tokens += len(job.seq.tokens)
                    forwards += job.seq.forwards
                    outputs.append((list(job.seq.tokens), job.seq.finish_reason, job.seq.forced_tokens))
                cell["seconds"].append(time.perf_counter() - start)
                cell["tokens"].append(tokens)
                cell["forwards"].append(forwards)
                cell["grammar"].append(clock.seconds)
                cell["mask"].append(clock.mask_seconds)
                cell["mask_calls"].append(clock.mask_calls)
                cell["outputs"].extend(outputs)
            print(f"{artifact.name}: repeat {repeat + 1}/{repeats} done", file=sys.stderr)
    rows = []
    for (mode, name), cell in cells.items():
        grammar = bench.grammars.get(name)
        checks = []
        for tokens, finish, _ in cell["outputs"]:
            if grammar is not None:
                checks.append(check(grammar, name, codec.decode(tokens), tokens, finish))
        rates = [t / s for t, s in zip(cell["tokens"], cell["seconds"])]
        passes = sum(cell["forwards"])
        row = {
            "artifact": artifact.name, "mode": mode, "constraint": name, "graph_version": 2 if name == V2 else 3,
            "prompts": len(prompts), "repeats": repeats, "max_tokens": artifact.max_tokens,
            "tokens": cell["tokens"], "forwards": cell["forwards"], "seconds": cell["seconds"],
            "tokens_per_forward": sum(cell["tokens"]) / passes,
            "tokens_per_s": rates, "tokens_per_s_p50": statistics.median(rates),
            "ms_per_pass": 1000 * sum(cell["seconds"]) / passes,
            "grammar_ms_per_pass": 1000 * sum(cell["grammar"]) / passes,
            "mask_ms_per_pass": 1000 * sum(cell["mask"]) / passes,
            "mask_calls_per_pass": sum(cell["mask_calls"]) / passes,
            "forced_tokens": sum(f for _, _, f in cell["outputs"]),
            "finish": {reason: sum(1 for _, f, _ in cell["outputs"] if f == reason)
                       for reason in sorted({str(f) for _, f, _ in cell["outputs"]})},
            "texts": [codec.decode(tokens) for tokens, _, _ in cell["outputs"][:len(prompts)]],
        }
        if grammar is not None:
            row["valid_share"] = sum(a for a, _ in checks) / len(checks)
            row["parsed_share"] = sum(p for _, p in checks) / len(checks)
            replayed = replay_masks(grammar, [tokens for tokens, _, _ in cell["outputs"][:len(prompts)]])
            row["replayed_masks"] = len(replayed)
            row["replayed_mask_us_p50"] = 1e6 * statistics.median(replayed) if replayed else 0.0
            row["replayed_mask_us_p90"] = 1e6 * quantile(replayed, 0.9) if replayed else 0.0
            row["replayed_mask_us_mean"] = 1e6 * statistics.fmean(replayed) if replayed else 0.0
        rows.append(row)
    for row in rows:  # against the same mode unconstrained, on the same (version-3) graph
        base = next(r for r in rows if r["mode"] == row["mode"] and r["constraint"] == "none")
        row["tokens_per_forward_ratio"] = row["tokens_per_forward"] / base["tokens_per_forward"]
        row["tokens_per_s_ratio"] = row["tokens_per_s_p50"] / base["tokens_per_s_p50"]
    return rows


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    constrained = [r for r in rows if "valid_share" in r]
    if constrained:
        valid = min(r["valid_share"] for r in constrained)
        out.append({"target": "100 % of constrained outputs accepted by their grammar (complete, or a prefix at "
                              "max_tokens), every artifact, mode and constraint",
                    "measured": valid, "met": valid >= TARGETS["valid"]})
        complete = [r for r in constrained if r["constraint"] == "schema"]
        if complete:
            parsed = min(r["parsed_share"] for r in complete)
            out.append({"target": "100 % of JSON-schema outputs complete, parsed and valid against the schema",
                        "measured": parsed, "met": parsed >= TARGETS["valid"]})
    for r in rows:
        if r["artifact"] == "miniature" and r["mode"] == "diffusion" and r["constraint"] == "schema":
            floor = TARGETS["diffusion_schema_tokens_per_forward"]
            out.append({"target": f"diffusion under the JSON schema ≥ {floor:g} tokens per forward (miniature)",
                        "measured": r["tokens_per_forward"], "met": r["tokens_per_forward"] >= floor})
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = []
    for name in dict.fromkeys(r["artifact"] for r in record["rows"]):
        lines += [f"**{name}**", "", "| mode | constraint | tokens / forward | × none | tokens/s | × none | ms / pass | "
                  "grammar ms / pass | mask calls / pass | mask µs replayed p50 / p90 | accepted | parsed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in record["rows"] if r["artifact"] == name):
            constrained = "valid_share" in r
            lines.append(
                f"| {r['mode']} | {r['constraint']} | {r['tokens_per_forward']:.2f} | "
                f"{r['tokens_per_forward_ratio']:.2f} | {r['tokens_per_s_p50']:.1f} | {r['tokens_per_s_ratio']:.2f} | "
                f"{r['ms_per_pass']:.1f} | {r['grammar_ms_per_pass']:.3f} | {r['mask_calls_per_pass']:.2f} | "
                + (f"{r['replayed_mask_us_p50']:.0f} / {r['replayed_mask_us_p90']:.0f} | {r['valid_share']:.0%} | "
                   f"{r['parsed_share']:.0%} |"
                   if constrained else "– | – | – |"))
        lines.append("")
    lines += ["| target | measured | met |", "| --- | --- | --- |"]
    for t in record["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--artifact", nargs="+", choices=["miniature", "real"], default=["miniature", "real"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts (half addition, half upper) per row")
    parser.add_argument("--real-prompts", type=int, default=2, help="the first of them on the real vocabulary")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--real-max-tokens", type=int, default=32,
                        help="max_tokens on the real vocabulary (random weights rarely end an answer)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-v2", dest="v2", action="store_false",
                        help="leave out the unconstrained rows on version-2 graphs (no export without --structured)")
    parser.add_argument("--quick", action="store_true", help="the miniature, 2 prompts, 1 repeat (for the tests)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: "
                                                                  "config.pbtxt's runtime_threads, empty: its own)")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="ONNX Runtime's threads sleep between passes (config.pbtxt's runtime_spin spins them), "
                             "so on a small machine they take less time from the host's grammar work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench_structured",
                        help="where the checkpoints and exports go, reused when there")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_structured")
    args = parser.parse_args(argv)
    if args.quick:
        args.artifact, args.prompts, args.repeats = ["miniature"], 2, 1

    half = (args.prompts + 1) // 2
    prompts = [p.prompt for pair in zip(held_out_set("addition", half), held_out_set("upper", half))
               for p in pair][:args.prompts]
    build: dict[str, Callable[[], Artifact]] = {
        "miniature": lambda: miniature_artifact(args.work, args.max_tokens, args.prompts, args.v2),
        "real": lambda: real_artifact(args.work, args.real_max_tokens, min(args.real_prompts, args.prompts),
                                      args.v2)}
    rows, compilers = [], {}
    started = time.perf_counter()
    for name in args.artifact:
        artifact = build[name]()
        bench = Bench(artifact, args.threads, args.spin)
        compilers[artifact.name] = bench.compiler_seconds
        try:
            rows += measure(bench, prompts[:artifact.prompts], args.modes, args.repeats, args.temperature, args.seed)
        finally:
            bench.stop()
    record = {
        "machine": machine(),
        "settings": {"threshold": parameter("threshold"), "steps": int(parameter("steps")),
                     "max_num_tokens": int(parameter("max_num_tokens")),
                     "prefill_chunk": int(parameter("prefill_chunk")),
                     "runtime_spin": parameter("runtime_spin") if args.spin else "false",
                     "threads": args.threads, "prefix_caching": False, "temperature": args.temperature,
                     "max_tokens": args.max_tokens, "real_max_tokens": args.real_max_tokens,
                     "repeats": args.repeats, "prompts": prompts, "real_prompts": min(args.real_prompts, args.prompts),
                     "real_checkpoint": {"layers": REAL_LAYERS, "hidden": REAL_HIDDEN, "vocabulary": 131072},
                     "schema": SCHEMA, "seed": args.seed},
        "compiler_seconds": compilers,
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "targets": targets(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_structured.json").write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
