"""`python -m client.audit`: vet a running deployment. For your prompts, on your deployed engine and precision,
which decoding setting is fastest while still giving the answers `ar` gives?

    python -m client.audit --url HOST:PORT --prompts FILE.jsonl [--out DIR]
        [--protocol grpc|http] [--grid JSON|FILE] [--concurrency N] [--max-tokens N] [--timeout S]
        [--min-agreement 0.99 | --min-accuracy A] [--pick tokens_per_forward|tokens_per_second]
        [--tokenizer DIR | --characters] [--max-divergences N] [--no-progress]

It sends every prompt in `ar` at temperature 0 (the reference), then in each setting of the grid (default:
diffusion at thresholds 0.5 to 0.99, fixed steps 1/2/4/8 with no threshold, block lengths 16/32/64,
`speculative`, and threshold decoding with re-masking), all at temperature 0, `--concurrency` requests at a time,
one setting after the other. Per setting it reports agreement with `ar` (exact text, and edit distance in the
checkpoint's tokens or in characters), accuracy against the prompts' references, the parallel-hallucination rate,
tokens per forward, latency p50/p99 and tokens/s (client/audit_measures.py). It picks the cheapest setting that meets
the target and prints its request fields and the `config.pbtxt` parameters that make it the server's default.

Writes into `--out` (default artifacts/audit): audit.json (everything, every answer), audit.md (the report, with
the divergent answers beside `ar`'s) and audit.png (agreement and tokens/s against tokens per forward).

A request the server refuses or fails is reported with its setting and never stops the audit. Exit status: 0 with
a recommendation, 1 when no setting (not even `ar`) meets the target or `ar` failed on every prompt, 2 for bad
input (a malformed prompts line, an unknown scorer, an invalid regex, a bad grid) or an unreachable server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from client.audit_input import (REFERENCE, AuditInputError, AuditPrompt, Setting, default_grid, load_grid,
                                load_prompts)
from client.audit_measures import (PICKS, Comparison, Outcome, Summary, compare, config_parameters, eligible,
                                   pbtxt_lines, recommend, summarize)
from client.audit_report import markdown, plot
from client.chat_template import ChatTemplate
from client.grpc_client import GrpcClient, grpc_target
from client.http_client import HttpClient, http_base
from client.request import Options

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT / "model_repository" / "dlm" / "1" / "tokenizer"  # as the gateway's --tokenizer
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
OPTION_NAMES = {f.name for f in dataclasses.fields(Options)}


class AuditError(Exception):
    """The audit cannot run (unreachable server, unusable tokenizer folder); the message says why."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client.audit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare every decoding setting with ar on your own prompts, through a running server, and "
                    "recommend the cheapest one that meets a target.",
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--url", help="server address HOST:PORT (default localhost:8001 for grpc, localhost:8000 "
                                      "for http); a http:// or grpc:// prefix also sets --protocol")
    parser.add_argument("--protocol", choices=("grpc", "http"), help="default grpc, or the --url's scheme")
    parser.add_argument("--model", default="dlm", help="Triton model name")
    parser.add_argument("--prompts", required=True, help="JSONL file: one {\"prompt\"|\"messages\", "
                                                          "\"reference\", \"scorer\"} object per line")
    parser.add_argument("--out", default="artifacts/audit", help="folder for audit.json, audit.md, audit.png")
    parser.add_argument("--grid", help="the settings to compare with ar: a JSON list of request-field objects "
                                       "(inline, or a file), e.g. '[{\"mode\": \"diffusion\", \"threshold\": 0.8}]'")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    parser.add_argument("--max-tokens", type=int, help="most tokens per answer (default: the server's; a prompt's "
                                                       "own max_tokens wins)")
    parser.add_argument("--timeout", type=float, help="seconds one request may take")
    parser.add_argument("--min-agreement", type=float,
                        help="target: share of answers equal to ar's (default 0.99 unless --min-accuracy is given)")
    parser.add_argument("--min-accuracy", type=float, help="target: accuracy against the prompts' references")
    parser.add_argument("--pick", choices=PICKS, default="tokens_per_forward",
                        help="what 'cheapest' means among the settings that meet the target (default: the most "
                             "tokens per forward, which does not depend on the load on this machine)")
    parser.add_argument("--tokenizer", help="folder with the checkpoint's tokenizer.json (edit distance in tokens) "
                                            "and chat template (default model_repository/dlm/1/tokenizer)")
    parser.add_argument("--characters", action="store_true", help="count edit distance in characters")
    parser.add_argument("--max-divergences", type=int, default=20,
                        help="divergent answers shown per setting in audit.md (all are in audit.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.protocol is None:
        args.protocol = "http" if (args.url or "").startswith(("http://", "https://")) else "grpc"
    args.url = args.url or DEFAULT_URLS[args.protocol]
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    for name in ("min_agreement", "min_accuracy"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if args.min_agreement is None and args.min_accuracy is None:
        args.min_agreement = 0.99
    return args


class Progress:
    """A progress bar on stderr (tqdm) when stderr is a terminal; otherwise one line per finished setting, which
    reads well in a log. Thread-safe."""

    def __init__(self, total: int, settings: int, enabled: bool):
        self.total, self.settings, self.enabled = total, settings, enabled
        self.finished = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            try:  # tqdm comes with the environment (a dependency of dependencies), not with the client
                from tqdm import tqdm  # type: ignore[import-untyped]
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, mininterval=0.3)

    def setting(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"{name:<28.28}")

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def setting_done(self, name: str, outcomes: Sequence[Outcome], seconds: float) -> None:
        self.finished += 1
        if self.enabled and self._bar is None:
            failed = sum(not o.ok for o in outcomes)
            print(f"audit [{self.finished}/{self.settings}] {name}: {len(outcomes)} requests in {seconds:.1f} s"
                  + (f", {failed} failed" if failed else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Auditor:
    """Sends the prompts in one setting after another through one client."""

    def __init__(self, client: GrpcClient | HttpClient, prompts: Sequence[AuditPrompt], concurrency: int,
                 max_tokens: int | None, timeout: float | None, progress: Progress):
        self.client, self.prompts, self.progress = client, prompts, progress
        self.concurrency, self.max_tokens, self.timeout = concurrency, max_tokens, timeout

    def request_fields(self, setting: Setting, prompt: AuditPrompt) -> dict[str, Any]:
        fields = {**setting.fields, "temperature": 0.0}
        max_tokens = prompt.max_tokens or self.max_tokens
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        if not prompt.add_special_tokens:
            fields["add_special_tokens"] = False
        return fields

    def one(self, setting: Setting, prompt: AuditPrompt) -> Outcome:
        try:
            result = self.client.generate(prompt.prompt, timeout=self.timeout, **self.request_fields(setting, prompt))
        except Exception as error:  # noqa: BLE001 - a failed request is a measure of its setting, never fatal
            return Outcome(error=str(error) or repr(error), error_type=type(error).__name__)
        finally:
            self.progress.update()
        return Outcome(result.text, result.num_tokens, result.num_forwards, result.latency, result.finish_reason)

    def run(self, setting: Setting) -> tuple[list[Outcome], float]:
        """The setting's outcome on every prompt, and the wall seconds they took."""
        self.progress.setting(setting.name)
        missing = sorted(set(setting.fields) - OPTION_NAMES)
        if missing:  # the installed client library predates these inputs: report, send nothing
            self.progress.update(len(self.prompts))
            message = (f"this client library cannot send the input(s) {', '.join(missing)} (client/request.py "
                       f"Options has no such field)")
            outcomes = [Outcome(error=message, error_type="UnsupportedInput") for _ in self.prompts]
            self.progress.setting_done(setting.name, outcomes, 0.0)
            return outcomes, 0.0
        start = time.perf_counter()
        with ThreadPoolExecutor(self.concurrency) as pool:
            outcomes = list(pool.map(lambda p: self.one(setting, p), self.prompts))
        seconds = time.perf_counter() - start
        self.progress.setting_done(setting.name, outcomes, seconds)
        return outcomes, seconds


def units_function(args: argparse.Namespace) -> tuple[Any, str]:
    """How edit distance counts (token ids of the checkpoint's tokenizer, or code points) and that in words."""
    if not args.characters:
        directory = Path(args.tokenizer) if args.tokenizer else DEFAULT_TOKENIZER
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            try:
                shown = directory.resolve().relative_to(Path.cwd())
            except ValueError:
                shown = directory
            return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                    f"tokens (the tokenizer in {shown})")
    return (lambda text: [ord(c) for c in text]), "characters"


def template(args: argparse.Namespace) -> ChatTemplate:
    if args.tokenizer is not None:
        directory = Path(args.tokenizer)
        if not directory.is_dir():
            raise AuditError(f"--tokenizer {directory}: no such folder")
        if not (directory / "tokenizer.json").is_file() and not args.characters:
            raise AuditError(f"--tokenizer {directory}: no tokenizer.json there (pass --characters to count "
                             "edit distance in characters)")
        return ChatTemplate.from_directory(directory)
    return ChatTemplate.from_directory(DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.is_dir() else None)


def connect(args: argparse.Namespace) -> GrpcClient | HttpClient:
    kind = GrpcClient if args.protocol == "grpc" else HttpClient
    client = kind(args.url, model=args.model, timeout=args.timeout)
    try:
        ready = client.is_ready()
    except Exception:  # noqa: BLE001 - any failure to ask is "unreachable"
        ready = False
    if not ready:
        client.close()
        raise AuditError(f"cannot reach model '{args.model}' at {args.url} over {args.protocol}: the server is not "
                         f"listening there or the model is not ready (is scripts/serve.sh running? Its gRPC port is "
                         f"8001 and its HTTP port 8000 by default)")
    return client


def prompt_record(prompt: AuditPrompt) -> dict[str, Any]:
    out: dict[str, Any] = {"line": prompt.line, "id": prompt.id, "prompt": prompt.prompt}
    if prompt.messages is not None:
        out["messages"] = prompt.messages
    return {**out, "reference": prompt.reference, "scorer": prompt.scorer, "max_tokens": prompt.max_tokens,
            "results": {}}


def result_record(outcome: Outcome, comparison: Comparison | None, correct: bool | None) -> dict[str, Any]:
    return {
        "text": outcome.text, "num_tokens": outcome.num_tokens, "num_forwards": outcome.num_forwards,
        "latency": outcome.latency, "finish_reason": outcome.finish_reason, "error": outcome.error,
        "error_type": outcome.error_type, "correct": correct,
        "same_as_ar": None if comparison is None else comparison.same,
        "edit_distance": None if comparison is None else comparison.edit_distance,
        "first_difference": None if comparison is None else comparison.first_difference,
        "first_difference_unit": None if comparison is None else comparison.first_difference_unit,
    }


def recommendation_record(chosen: Summary | None, pick: str, server: dict[str, str] | None) -> dict[str, Any] | None:
    if chosen is None:
        return None
    rate = "" if chosen.tokens_per_second is None else f", {chosen.tokens_per_second:.1f} tokens/s"
    accuracy = "" if chosen.accuracy is None else f", accuracy {chosen.accuracy:.1%}"
    parameters, per_request = config_parameters(chosen.fields, None if server is None else set(server))
    return {
        "setting": chosen.name, "request_fields": chosen.fields, "request_fields_json": json.dumps(chosen.fields),
        "config_parameters": parameters, "per_request_fields": per_request,
        "server_parameters": None if server is None else {k: server[k] for k in parameters if k in server},
        "pick": pick, "agreement": chosen.agreement, "accuracy": chosen.accuracy,
        "tokens_per_forward": chosen.tokens_per_forward, "tokens_per_second": chosen.tokens_per_second,
        "summary": f"{chosen.tokens_per_forward:.2f} tokens per forward, agreement with ar {chosen.agreement:.1%}"
                   f"{accuracy}{rate}",
    }


def server_parameters(args: argparse.Namespace) -> dict[str, str] | None:
    """The model's config.pbtxt parameters as the server reports them (Triton's model-config endpoint), or None
    when it cannot be read."""
    try:
        if args.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(grpc_target(args.url))
            try:
                config = client.get_model_config(args.model, as_json=True, client_timeout=10)["config"]
            finally:
                client.close()
        else:
            import httpx

            response = httpx.get(f"{http_base(args.url)}/v2/models/{args.model}/config", timeout=10)
            response.raise_for_status()
            config = response.json()
        return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}
    except Exception:  # noqa: BLE001 - the recommendation then names every parameter the project's config has
        return None


def console_table(summaries: Sequence[Summary]) -> str:
    width = max(len(s.name) for s in summaries)
    lines = [f"{'setting':<{width}}   agree  edit  accur  halluc  tok/fwd  p50 ms  p99 ms   tok/s  failed"]

    def cell(value: float | None, spec: str, width: int) -> str:
        return f"{'':>{width}}" if value is None else f"{value:{width}{spec}}"

    for s in summaries:
        lines.append(f"{s.name:<{width}}  {cell(s.agreement, '.1%', 6)}  {cell(s.mean_edit_distance, '.2f', 4)}  "
                     f"{cell(s.accuracy, '.1%', 5)}  {cell(s.hallucination_rate, '.1%', 6)}  "
                     f"{cell(s.tokens_per_forward, '.2f', 7)}  {cell(s.latency_p50_ms, '.1f', 6)}  "
                     f"{cell(s.latency_p99_ms, '.1f', 6)}  {cell(s.tokens_per_second, '.1f', 6)}  "
                     f"{s.errors}/{s.requests}")
    return "\n".join(lines)


def audit(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run the audit; the content of audit.json."""
    chat = template(args)
    prompts = load_prompts(args.prompts, chat)
    grid = load_grid(args.grid) if args.grid else default_grid()
    units, unit_words = units_function(args)
    client = connect(args)
    parameters = server_parameters(args)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    progress = Progress(len(prompts) * (1 + len(grid)), 1 + len(grid), enabled=not args.no_progress)
    try:
        auditor = Auditor(client, prompts, args.concurrency, args.max_tokens, args.timeout, progress)
        runs = [(setting, *auditor.run(setting)) for setting in [REFERENCE, *grid]]
    finally:
        progress.close()
        client.close()
    reference = runs[0][1]
    records = [prompt_record(p) for p in prompts]
    summaries = []
    for setting, outcomes, seconds in runs:
        comparisons: list[Comparison | None] = []
        for prompt, mine, ar, record in zip(prompts, outcomes, reference, records):
            comparison = None
            if mine.text is not None and ar.text is not None:
                comparison = compare(prompt, ar.text, mine.text, units)
            comparisons.append(comparison)
            correct = None if mine.text is None else prompt.correct(mine.text)
            record["results"][setting.name] = result_record(mine, comparison, correct)
        summaries.append(summarize(setting, prompts, outcomes, reference, comparisons, seconds))
    chosen = None if summaries[0].failed else recommend(summaries, args.min_agreement, args.min_accuracy, args.pick)
    return {
        "command": ["python", "-m", "client.audit", *argv],
        "server": {"url": args.url, "protocol": args.protocol, "model": args.model},
        "prompts_file": str(args.prompts), "prompts_count": len(prompts),
        "started": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - clock,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": 0.0,
        "edit_distance_unit": unit_words,
        "target": {"min_agreement": args.min_agreement, "min_accuracy": args.min_accuracy, "pick": args.pick},
        "settings": [s.to_dict() for s in summaries],
        "recommendation": recommendation_record(chosen, args.pick, parameters),
        "prompts": records,
    }


def report(result: dict[str, Any], summaries: list[Summary]) -> str:
    """What the command prints: the table, the settings that miss the target, the recommendation."""
    target = result["target"]
    lines = [console_table(summaries), ""]
    for s in summaries:
        if s.errors:
            lines.append(f"{s.name}: {s.errors} of {s.requests} requests failed: {s.error_examples[0]}")
    recommendation = result["recommendation"]
    if recommendation is None:
        reason = ("ar failed on every prompt: " + summaries[0].error_examples[0] if summaries[0].failed else
                  "no setting meets the target, not even ar: "
                  + str(eligible(summaries[0], target["min_agreement"], target["min_accuracy"])))
        return "\n".join(lines + [reason])
    picked = "most tokens per forward" if target["pick"] == "tokens_per_forward" else "highest tokens/s"
    lines += [
        f"recommended ({picked} among the settings that meet the target): {recommendation['setting']}",
        f"  {recommendation['summary']}",
        f"  request fields: {recommendation['request_fields_json']}",
    ]
    if recommendation["config_parameters"]:
        current = recommendation["server_parameters"]
        lines.append("  or as the server's defaults, these entries of config.pbtxt's parameters (for requests that "
                     "leave these fields out)" + (":" if current is None else ", with the server's values now:"))
        for key, line in zip(recommendation["config_parameters"], pbtxt_lines(recommendation["config_parameters"])):
            now = "" if current is None else f"  # now {current.get(key, '(absent)')!r}"
            lines.append(f"    {line}{now}")
    if recommendation["per_request_fields"]:
        lines.append(f"  sent with each request (no config.pbtxt parameter of this server sets them): "
                     f"{', '.join(recommendation['per_request_fields'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        result = audit(args, argv)
    except (AuditInputError, AuditError) as error:
        print(f"python -m client.audit: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out / "audit.md").write_text(markdown(result, args.max_divergences))
    plot(result, out / "audit.png")
    summaries = [Summary(**s) for s in result["settings"]]
    print(report(result, summaries))
    print(f"\nwrote {out / 'audit.json'}, {out / 'audit.md'}, {out / 'audit.png'} ({result['seconds']:.1f} s, "
          f"{result['prompts_count']} prompts x {len(summaries)} settings)")
    return 0 if result["recommendation"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
