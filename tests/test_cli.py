"""`python -m client` against a real tritonserver: streamed text then a statistics line, `--json` that parses, prompts
from stdin, and the server's message with exit status 1 on a refused request; the guided decoding flags
(`--json-schema`, `--json-object`, `--regex`, `--lark`) and the penalties mapped onto the model's inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from client.__main__ import options, parse_args
from conftest import ROOT
from export.tasks import held_out_set

PROBLEMS = held_out_set("upper", 3)
STATISTICS = re.compile(
    r"^\[(\d+) tokens, (\d+) forwards, [\d.]+ tokens/forward, latency [\d.]+ ms, first block [\d.]+ ms, "
    r"[\d.]+ tokens/s\]$"
)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )


def test_streamed_generation_prints_the_text_and_a_statistics_line(triton):
    problem = PROBLEMS[0]
    run = cli(problem.prompt, "--url", triton.grpc_url, "--stream", "--mode", "diffusion", "--threshold", "0.9",
              "--max-tokens", "48")
    assert run.returncode == 0, run.stderr
    assert run.stdout == problem.answer + "\n"
    stats = STATISTICS.match(run.stderr.strip())
    assert stats, run.stderr
    tokens, forwards = int(stats.group(1)), int(stats.group(2))
    assert tokens == len(problem.answer) + 1 and forwards < tokens / 3  # several tokens per forward


def test_json_output_parses_one_object_per_stdin_line(triton):
    stdin = "".join(p.prompt + "\n" for p in PROBLEMS[1:]) + "\n"  # a blank line is skipped
    run = cli("--protocol", "http", "--url", triton.http_url, "--mode", "speculative", "--json", "--stream",
              stdin=stdin)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in results] == [p.prompt for p in PROBLEMS[1:]]
    assert [r["text"] for r in results] == [p.answer for p in PROBLEMS[1:]]
    for r in results:
        assert r["mode"] == "speculative" and r["num_tokens"] == len(r["text"]) + 1
        assert r["tokens_per_forward"] == r["num_tokens"] / (r["num_forwards"] - 1)
        assert 0 < r["time_to_first_block"] < r["latency"]


def test_a_refused_request_prints_the_server_message_and_exits_1(triton):
    run = cli("4821+377=", "--url", triton.grpc_url, "--block-length", "1")
    assert run.returncode == 1
    assert re.fullmatch(r"error \(InvalidRequest\): block_length must be in \[2, \d+\], got 1", run.stderr.strip())
    run = cli("4821+377=", "--url", triton.grpc_url, "--steps", "0", "--json")
    assert run.returncode == 1
    assert json.loads(run.stdout) == {"prompt": "4821+377=", "error": "steps must be in [1, 32], got 0",
                                      "type": "InvalidRequest"}


def test_sampling_and_logprobs_options(triton):
    problem = PROBLEMS[0]
    run = cli(problem.prompt, "--url", triton.grpc_url, "--mode", "ar", "--max-tokens", "6", "--logprobs", "2",
              "--top-k", "1", "--top-p", "0.5", "--temperature", "1.5")
    assert run.returncode == 0, run.stderr
    assert run.stdout == problem.answer[:6] + "\n"  # top_k 1: the greedy text at any temperature
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 7 and STATISTICS.match(lines[-1])
    for char, line in zip(problem.answer, lines[:6]):  # token, log prob, [alternatives]
        token, logprob, alternatives = line.split("\t")
        assert token == repr(char) and float(logprob) <= 0 and alternatives.startswith(f"[{char!r} ")
    run = cli(problem.prompt, "--protocol", "http", "--url", triton.http_url, "--mode", "ar", "--max-tokens", "6",
              "--logprobs", "0", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["return_log_probs"], result["top_logprobs"]) == (True, 0)
    assert "".join(t["token"] for t in result["tokens"]) == result["text"] == problem.answer[:6]
    assert all(t["top_logprobs"] == [] and t["logprob"] <= 0 for t in result["tokens"])
    run = cli(problem.prompt, "--url", triton.grpc_url, "--top-k", "0")
    assert run.returncode == 1 and run.stderr.strip() == "error (InvalidRequest): top_k must be in [1, 64], got 0"



def test_min_tokens_ignore_eos_echo_remasking_and_sampling_parameters_flags(triton):
    problem = PROBLEMS[0]
    run = cli(problem.prompt, "--url", triton.grpc_url, "--mode", "diffusion", "--max-tokens", "44", "--ignore-eos",
              "--echo", "--remask-threshold", "0.5", "--max-remasks", "2", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["ignore_eos"], result["exclude_input_in_output"], result["remask_threshold"],
            result["max_remasks"]) == (True, False, 0.5, 2)
    assert result["num_tokens"] == 44 and result["text"].startswith(problem.prompt)
    run = cli(problem.prompt, "--protocol", "http", "--url", triton.http_url, "--mode", "ar", "--max-tokens", "48",
              "--min-tokens", "40")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(problem.answer) and len(run.stdout.rstrip("\n")) >= 40  # no end token before 40
    run = cli(problem.prompt, "--url", triton.grpc_url, "--sampling-parameters", '{"mode": "ar", "max_tokens": "5"}')
    assert run.returncode == 0 and run.stdout == problem.answer[:5] + "\n", run.stderr
    run = cli(problem.prompt, "--url", triton.grpc_url, "--min-tokens", "-1")
    assert run.returncode == 1
    assert run.stderr.strip() == "error (InvalidRequest): min_tokens must be in [0, 64] (at most max_tokens), got -1"


SCHEMA = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}


def test_guided_decoding_flags_map_onto_the_guide_inputs(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA, indent=2))
    grammar_file = tmp_path / "answer.lark"
    grammar_file.write_text('start: "yes" | "no"\n')
    cases = [
        (["--json-schema", str(schema_file)], {"guided_decoding_guide_type": "json_schema",
                                               "guided_decoding_guide": schema_file.read_text()}),
        (["--json-schema", json.dumps(SCHEMA)], {"guided_decoding_guide_type": "json_schema",
                                                 "guided_decoding_guide": json.dumps(SCHEMA)}),
        (["--json-object"], {"guided_decoding_guide_type": "json"}),
        (["--regex", "(yes|no), [0-9]+"], {"guided_decoding_guide_type": "regex",
                                           "guided_decoding_guide": "(yes|no), [0-9]+"}),
        (["--lark", str(grammar_file)], {"guided_decoding_guide_type": "lark",
                                         "guided_decoding_guide": 'start: "yes" | "no"\n'}),
        (["--lark", 'start: "a"+'], {"guided_decoding_guide_type": "lark", "guided_decoding_guide": 'start: "a"+'}),
        ([], {}),
    ]
    for flags, inputs in cases:
        values = options(parse_args(["12+30=", "--mode", "ar", *flags]))
        assert values == {"mode": "ar", **inputs}, flags
    # --json is the output format, not a guide
    assert options(parse_args(["12+30=", "--json"])) == {}


def test_penalty_flags_map_onto_their_inputs():
    values = options(parse_args(["12+30=", "--frequency-penalty", "0.5", "--presence-penalty", "-1",
                                 "--repetition-penalty", "1.2"]))
    assert values == {"frequency_penalty": 0.5, "presence_penalty": -1.0, "repetition_penalty": 1.2}


@pytest.mark.parametrize("flags, words", [
    (["--json-schema", "{}", "--regex", "a"], "not allowed with argument"),
    (["--json-object", "--lark", "start: x"], "not allowed with argument"),
    (["--json-schema", "missing-schema.json"], "--json-schema: 'missing-schema.json' is neither a file nor JSON"),
    (["--frequency-penalty", "high"], "invalid float value"),
])
def test_bad_guide_and_penalty_flags_are_refused_before_any_request(flags, words, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["12+30=", *flags])
    assert exited.value.code == 2 and words in capsys.readouterr().err


def test_a_guide_reaches_the_model_which_refuses_it_on_a_version_2_artifact(triton):
    """The session's server runs the shipped artifact (engine contract version 2, no allowed-token mask): the guide
    arrives as the model's inputs and is refused with the command that rebuilds the artifact; the penalties arrive
    and are range-checked by the server."""
    run = cli("12+30=", "--url", triton.grpc_url, "--json-schema", json.dumps(SCHEMA), "--mode", "ar")
    assert run.returncode == 1
    assert "engine contract version 2" in run.stderr and "--structured" in run.stderr, run.stderr
    run = cli("12+30=", "--protocol", "http", "--url", triton.http_url, "--regex", "[0-9]+", "--json")
    assert run.returncode == 1 and "--structured" in json.loads(run.stdout)["error"]
    run = cli("12+30=", "--url", triton.grpc_url, "--frequency-penalty", "3")
    assert run.returncode == 1
    assert run.stderr.strip() == "error (InvalidRequest): frequency_penalty must be in [-2, 2], got 3.0"
    problem = PROBLEMS[0]
    run = cli(problem.prompt, "--url", triton.grpc_url, "--mode", "ar", "--max-tokens", "48",
              "--presence-penalty", "0", "--repetition-penalty", "1")
    assert run.returncode == 0 and run.stdout == problem.answer + "\n", run.stderr
