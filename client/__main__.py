"""`python -m client`: generations from the shell.

    python -m client "4821+377=" --mode diffusion --stream
    python -m client "upper:abcdefghijklmnopqrstuvwxyzabcdefghij=" --mode speculative --json
    printf '12+30=\\n7+8=\\n' | python -m client --protocol http      # one request per line of stdin

    python -m client "57+8=" --temperature 0.8 --top-k 5 --top-p 0.9 --logprobs 3
    python -m client "57+8=" --ignore-eos --max-tokens 32 --echo   # decode to max_tokens, the prompt first
    python -m client "57+8=" --json-schema schema.json --mode diffusion   # an answer that validates (or: inline JSON)
    python -m client "57+8=" --regex "(yes|no), [0-9]+" --repetition-penalty 1.2

The text goes to stdout (block by block with --stream), then one line of statistics to stderr; with --logprobs N,
each generated token's log prob and its N best alternatives go to stderr before that line. With --json, stdout gets one
JSON object per request instead (text, counts, tokens per forward, latency, time to first block, and with
--logprobs the tokens). A failed request prints the server's message (or a JSON object with "error") and the exit
status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from client.request import MODES
from client.result import DLMError, Result, Token

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client", description="Generate with the dlm model on a Triton server.",
        epilog="Options left out take the server's defaults (config.pbtxt parameters).",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; without it, one request per line of stdin")
    parser.add_argument("--mode", choices=MODES, help="decoding mode")
    parser.add_argument("--stream", action="store_true", help="print the text block by block as it commits")
    parser.add_argument("--threshold", type=float, help="diffusion: commit every position at least this confident")
    parser.add_argument("--steps", type=int,
                        help="diffusion: refinement steps per block; with --threshold, the most passes per block")
    parser.add_argument("--remask-threshold", type=float,
                        help="diffusion: mask a committed token again when its confidence falls below this")
    parser.add_argument("--max-remasks", type=int, help="diffusion: re-maskings allowed per block")
    parser.add_argument("--block-length", type=int, help="positions per block")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens that reach probability p")
    parser.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per request)")
    parser.add_argument("--min-tokens", type=int, help="no end token before this many tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="no end token at all: decode to --max-tokens")
    parser.add_argument("--no-draft-adapter", action="store_true",
                        help="speculative: draft with the base weights, not the engine's draft-only LoRA")
    parser.add_argument("--echo", action="store_true",
                        help="the prompt's text before the answer (sends exclude_input_in_output false)")
    parser.add_argument("--sampling-parameters", metavar="JSON",
                        help="vLLM's sampling_parameters, a JSON object of settings")
    parser.add_argument("--logprobs", type=int, metavar="N",
                        help="report each token's log prob and its N best alternatives (0: the token's only)")
    parser.add_argument("--stop", action="append", metavar="WORD", help="stop word (repeatable)")
    penalties = parser.add_argument_group("penalties", "on the engine's candidates, in every mode")
    penalties.add_argument("--frequency-penalty", type=float, metavar="F",
                           help="[-2, 2] (OpenAI's): a candidate's logit loses F for each time it occurs in the answer")
    penalties.add_argument("--presence-penalty", type=float, metavar="P",
                           help="[-2, 2] (OpenAI's): a candidate's logit loses P once it occurs in the answer")
    penalties.add_argument("--repetition-penalty", type=float, metavar="R",
                           help="(0, 2] (vLLM's; 1: off): a candidate in the prompt or the answer has its logit "
                                "divided by R when positive, multiplied by R otherwise")
    guided = parser.add_argument_group(
        "guided decoding", "one grammar the answer follows in every mode (sent as guided_decoding_guide_type and "
                           "guided_decoding_guide; the artifact must be exported with --structured)")
    guide = guided.add_mutually_exclusive_group()
    guide.add_argument("--json-schema", metavar="FILE_OR_JSON",
                       help="a JSON schema the answer validates against: a file, or the schema's JSON itself")
    guide.add_argument("--json-object", action="store_true", help="any JSON object (OpenAI's json_object)")
    guide.add_argument("--regex", metavar="RE", help="a regular expression the whole answer matches")
    guide.add_argument("--lark", metavar="FILE_OR_GRAMMAR", help="a Lark grammar: a file, or the grammar itself")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", help="server address (default localhost:8001 for grpc, localhost:8000 for http)")
    parser.add_argument("--model", default="dlm", help="Triton model name")
    parser.add_argument("--timeout", type=float, help="seconds a request may take")
    parser.add_argument("--json", action="store_true", help="print one JSON object per request")
    args = parser.parse_args(argv)
    try:
        args.guide = guide_inputs(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def guide_inputs(args: argparse.Namespace) -> dict[str, str]:
    """The guided decoding inputs of --json-schema, --json-object, --regex or --lark (none without one). A value
    that names a file is read; the server compiles the guide and refuses a bad one with the compiler's message."""
    if args.json_object:
        return {"guided_decoding_guide_type": "json"}
    if args.regex is not None:
        return {"guided_decoding_guide_type": "regex", "guided_decoding_guide": args.regex}
    if args.json_schema is not None:
        text = args.json_schema
        if os.path.isfile(text):
            text = read_guide("--json-schema", text)
        else:
            try:
                json.loads(text)
            except ValueError as e:
                raise ValueError(f"--json-schema: '{text}' is neither a file nor JSON ({e})") from e
        return {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": text}
    if args.lark is not None:
        text = read_guide("--lark", args.lark) if os.path.isfile(args.lark) else args.lark
        return {"guided_decoding_guide_type": "lark", "guided_decoding_guide": text}
    return {}


def read_guide(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {path}: {e}") from e


def options(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "mode": args.mode, "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "seed": args.seed, "stop_words": args.stop, "block_length": args.block_length,
        "threshold": args.threshold, "steps": args.steps, "remask_threshold": args.remask_threshold,
        "max_remasks": args.max_remasks, "min_tokens": args.min_tokens, "ignore_eos": args.ignore_eos or None,
        "exclude_input_in_output": False if args.echo else None, "sampling_parameters": args.sampling_parameters,
        "draft_adapter": False if args.no_draft_adapter else None,
        "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty,
        "repetition_penalty": args.repetition_penalty, **getattr(args, "guide", {}),
    }
    if args.logprobs is not None:
        values.update(return_log_probs=True, top_logprobs=args.logprobs)
    return {k: v for k, v in values.items() if v is not None}


def prompts(args: argparse.Namespace) -> Iterator[str]:
    if args.prompt is not None:
        yield args.prompt
        return
    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if line:
            yield line


def statistics(result: Result) -> str:
    rate = result.num_tokens / result.latency if result.latency > 0 else 0.0
    return (
        f"[{result.num_tokens} tokens, {result.num_forwards} forwards, {result.tokens_per_forward:.2f} tokens/forward, "
        f"latency {result.latency * 1000:.1f} ms, first block {result.time_to_first_block * 1000:.1f} ms, "
        f"{rate:.1f} tokens/s]"
    )


def log_prob_lines(tokens: list[Token]) -> str:
    """One line per token: its text, log prob, and alternatives."""
    lines = []
    for token in tokens:
        alternatives = ", ".join(f"{a.text!r} {a.logprob:.4f}" for a in token.top_logprobs)
        lines.append(f"{token.text!r}\t{token.logprob:.4f}" + (f"\t[{alternatives}]" if alternatives else ""))
    return "\n".join(lines)


def run_one(client: GrpcClient | HttpClient, prompt: str, args: argparse.Namespace) -> Result:
    kwargs = options(args)
    if not args.stream:
        return client.generate(prompt, timeout=args.timeout, **kwargs)
    with client.generate_stream(prompt, timeout=args.timeout, **kwargs) as stream:
        for block in stream:
            if not args.json:
                sys.stdout.write(block.text)
                sys.stdout.flush()
    return stream.result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = args.url or DEFAULT_URLS[args.protocol]
    kind = GrpcClient if args.protocol == "grpc" else HttpClient
    failed = False
    with kind(url, model=args.model) as client:
        for prompt in prompts(args):
            try:
                result = run_one(client, prompt, args)
            except DLMError as error:
                failed = True
                if args.json:
                    print(json.dumps({"prompt": prompt, "error": str(error), "type": type(error).__name__}))
                else:
                    if args.stream:
                        print()
                    print(f"error ({type(error).__name__}): {error}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"prompt": prompt, **options(args), **result.to_dict()}), flush=True)
            else:
                print("" if args.stream else result.text, flush=True)
                if result.tokens is not None:
                    print(log_prob_lines(result.tokens), file=sys.stderr, flush=True)
                print(statistics(result), file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the open stream was closed on the way out, which cancelled the request
        sys.exit(130)
