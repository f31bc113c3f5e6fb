"""`python -m client.audit` (issue 12 item 1): the prompts file and its errors, the scorers, the grid, the measures
and the recommendation, the report, offline against a scripted client; then a small audit end to end against the
session's real tritonserver whose recommendation, applied as request fields and as config.pbtxt parameters on a
second server, reproduces the agreement it reported. (tests/test_audit.py is the dependency audit.)"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client import audit as audit_cli
from client.audit_input import (AuditInputError, AuditPrompt, Setting, default_grid, load_grid, load_prompts,
                                parse_grid, score)
from client.audit_measures import (CONFIG_PARAMETERS, Outcome, Summary, compare, config_parameters, edit_distance,
                                   first_difference, recommend, summarize)
from client.chat_template import ChatTemplate
from client.result import InvalidRequest, Result
from conftest import ROOT

CONFIG = ROOT / "model_repository" / "dlm" / "config.pbtxt"
NO_TEMPLATE = ChatTemplate({}, {})


def write_lines(path: Path, *lines: Any) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- the prompts file ---------------------------------------------------------------------------------------------
def test_prompts_file_takes_prompts_messages_references_and_scorers(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    }))
    path = write_lines(
        tmp_path / "prompts.jsonl",
        {"prompt": "12+30=", "reference": "42", "scorer": "number", "id": "a"},
        "",
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user",
                       "content": [{"type": "text", "text": "upper:"}, {"type": "text", "text": "ab="}]}],
         "reference": "AB"},
        {"prompt": "x", "reference": 7, "max_tokens": 4, "meta": {"anything": [1]}},
        {"prompt": "y", "reference": "^\\d+$", "scorer": "regex"},
    )
    prompts = load_prompts(path, ChatTemplate.from_directory(folder))
    assert [p.line for p in prompts] == [1, 3, 4, 5]
    assert prompts[0] == AuditPrompt(1, "12+30=", "42", "number", "a")
    # the gateway's rendering: its Message model joins text parts, the template writes the BOS and the generation
    # prompt, and the server is told to add no special tokens (as transformers encodes a rendered chat prompt)
    assert prompts[1].prompt == "<s><|system|>Be brief.\n<|user|>upper:ab=\n<|assistant|>"
    assert not prompts[1].add_special_tokens and prompts[0].add_special_tokens
    assert prompts[1].scorer == "exact" and prompts[1].messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "upper:ab="}]
    assert prompts[2].reference == "7" and prompts[2].max_tokens == 4
    assert prompts[3].correct("123") is True and prompts[3].correct("12a") is False
    assert AuditPrompt(9, "p").correct("anything") is None
    # without a template (the miniature): one user message is sent as it is
    plain = load_prompts(write_lines(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "7+8="}]}),
                         NO_TEMPLATE)
    assert plain[0].prompt == "7+8=" and plain[0].add_special_tokens  # sent as a completion prompt would be


BAD_LINES = [
    ('{"prompt": "1+1=", "reference": "2"', "not valid JSON"),
    ('["1+1="]', "expected a JSON object"),
    ({"prompt": "1+1=", "reference": "2", "scorer": "fuzzy"}, "unknown scorer 'fuzzy'"),
    ({"prompt": "1+1=", "reference": "(2", "scorer": "regex"}, "invalid regex '(2'"),
    ({"prompt": "1+1=", "referense": "2"}, "unknown key(s) 'referense'"),
    ({"prompt": "1+1=", "messages": [{"role": "user", "content": "x"}]}, "exactly one of 'prompt'"),
    ({"reference": "2"}, "exactly one of 'prompt'"),
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": "1+1=", "scorer": "exact"}, "scorer 'exact' needs a 'reference'"),
    ({"prompt": "1+1=", "reference": "two", "scorer": "number"}, "needs a numeric reference"),
    ({"prompt": "1+1=", "reference": True}, "'reference' must be a string or a number"),
    ({"prompt": "1+1=", "max_tokens": 0}, "'max_tokens' must be a positive integer"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] is not a chat message (role:"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "prompts.jsonl", {"prompt": "7+8=", "reference": "15"}, "", line)
    with pytest.raises(AuditInputError) as error:
        load_prompts(path, NO_TEMPLATE)
    assert str(error.value).startswith(f"{path} line 3: ") and message in str(error.value), str(error.value)


def test_an_empty_or_missing_prompts_file_is_refused(tmp_path):
    with pytest.raises(AuditInputError, match="holds no prompts"):
        load_prompts(write_lines(tmp_path / "empty.jsonl", "", "  "), NO_TEMPLATE)
    with pytest.raises(AuditInputError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl", NO_TEMPLATE)


def test_scorers():
    assert score("exact", "42", " 42\n") and not score("exact", "42", "420")
    assert score("contains", "BC", "ABCD") and not score("contains", "bc", "ABCD")
    assert score("number", "1234", "the answer is 1,234.") and score("number", "-2.50", "so -2.5")
    assert score("number", "7", "3 then 7") and not score("number", "3", "3 then 7")  # the last number counts
    assert not score("number", "7", "seven")
    assert score("regex", r"^\s*60\s*$", "60\n") and not score("regex", r"^\s*60\s*$", "600")
    with pytest.raises(AuditInputError, match="unknown scorer"):
        score("fuzzy", "a", "a")


# --- the grid -----------------------------------------------------------------------------------------------------
def test_default_grid():
    grid = {s.name: s.fields for s in default_grid()}
    thresholds = [f["threshold"] for f in grid.values() if set(f) == {"mode", "threshold"}]
    assert thresholds == [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert [f["steps"] for f in grid.values() if set(f) == {"mode", "steps"}] == [1, 2, 4, 8]  # no threshold
    assert [f["block_length"] for f in grid.values() if "block_length" in f] == [16, 32, 64]
    assert grid["speculative"] == {"mode": "speculative"}
    remasking = [f for f in grid.values() if "remask_threshold" in f]
    assert remasking and all(set(f) == {"mode", "threshold", "remask_threshold", "max_remasks"} for f in remasking)
    assert "ar" not in grid and all(f["mode"] in ("diffusion", "speculative") for f in grid.values())


def test_grid_inline_or_from_a_file(tmp_path):
    text = '[{"mode": "ar"}, {"mode": "diffusion", "threshold": 0.8, "block_length": 16}, ' \
           '{"name": "fast", "mode": "diffusion", "steps": 1}]'
    inline = load_grid(text)
    (tmp_path / "grid.json").write_text(text)
    assert load_grid(str(tmp_path / "grid.json")) == inline == [  # ar is always the reference: dropped
        Setting("diffusion threshold=0.8 block_length=16", {"mode": "diffusion", "threshold": 0.8, "block_length": 16}),
        Setting("fast", {"mode": "diffusion", "steps": 1}),
    ]


@pytest.mark.parametrize("grid, message", [
    ({"mode": "ar"}, "expected a non-empty JSON list"),
    ([{"mode": "diffusion", "treshold": 0.5}], "entry 0: unknown field(s) 'treshold'"),
    ([{"mode": "speculative"}, {"threshold": "0.5"}], "entry 1: 'threshold' must be int or float"),
    ([{"steps": True}], "'steps' must be int"),
    ([{"mode": "greedy"}], "mode 'greedy' is unknown"),
    ([{"name": "x", "mode": "speculative"}, {"name": "x", "steps": 2}], "'x' used twice"),
    ([{"mode": "ar"}], "holds only the reference ar"),
    ([{}], "sets no request field"),
])
def test_a_bad_grid_is_refused_naming_the_entry(grid, message):
    with pytest.raises(AuditInputError) as error:
        parse_grid(grid)
    assert message in str(error.value), str(error.value)


def test_a_grid_that_is_neither_json_nor_a_file(tmp_path):
    with pytest.raises(AuditInputError, match="neither inline JSON nor a readable file"):
        load_grid(str(tmp_path / "nope.json"))
    with pytest.raises(AuditInputError, match="not valid JSON"):
        load_grid('[{"mode": }]')


# --- the measures -------------------------------------------------------------------------------------------------
def reference_distance(a, b) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_edit_distance_and_first_difference():
    chars = lambda text: [ord(c) for c in text]  # noqa: E731
    assert edit_distance(chars("kitten"), chars("sitting")) == 3
    assert edit_distance([], [1, 2]) == edit_distance([1, 2], []) == 2 and edit_distance([5], [5]) == 0
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 14))]
        b = [rng.randint(0, 3) for _ in range(rng.randint(0, 14))]
        assert edit_distance(a, b) == reference_distance(a, b), (a, b)
    assert first_difference("5198", "5908") == 1 and first_difference("AB", "ABC") == 2
    assert first_difference("same", "same") is None


def outcome(text: str, forwards: int, latency: float = 0.1) -> Outcome:
    return Outcome(text, len(text) + 1, forwards, latency, "stop")


def test_summary_measures():
    prompts = [AuditPrompt(1, "12+30=", "42"), AuditPrompt(2, "7+8=", "15"), AuditPrompt(3, "9+9=", "18"),
               AuditPrompt(4, "no reference")]
    ar = [outcome("42", 4), outcome("15", 4), outcome("17", 4), outcome("hello", 4)]
    mine = [outcome("42", 2, 0.2), outcome("16", 2, 0.4), outcome("18", 2, 0.1),
            Outcome(error="refused", error_type="InvalidRequest")]
    units = lambda text: [ord(c) for c in text]  # noqa: E731
    comparisons = [compare(p, a.text or "", m.text or "", units) if m.ok else None
                   for p, a, m in zip(prompts, ar, mine)]
    summary = summarize(Setting("d", {"mode": "diffusion"}), prompts, mine, ar, comparisons, wall_seconds=2.0)
    assert (summary.requests, summary.errors, summary.error_examples) == (4, 1, ["InvalidRequest: refused"])
    assert (summary.ar_answered, summary.compared, summary.references) == (4, 3, 3)
    assert summary.agreement == pytest.approx(1 / 3)
    assert summary.mean_edit_distance == pytest.approx(2 / 3)
    assert summary.mean_normalized_edit_distance == pytest.approx((0 + 1 / 2 + 1 / 2) / 3)
    assert summary.accuracy == pytest.approx(2 / 3)
    assert (summary.hallucinations, summary.hallucination_rate) == (1, pytest.approx(1 / 3))  # 15 → 16 only
    assert summary.tokens == 9 and summary.forwards_after_prefill == 3 and summary.tokens_per_forward == 3.0
    assert summary.latency_p50_ms == pytest.approx(200.0) and summary.latency_p99_ms == pytest.approx(396.0)
    assert summary.tokens_per_second == pytest.approx(4.5)
    reference = summarize(Setting("ar", {"mode": "ar"}), prompts, ar, ar,
                          [compare(p, a.text or "", a.text or "", units) for p, a in zip(prompts, ar)], 1.0)
    assert reference.agreement == 1.0 and reference.hallucination_rate is None
    assert reference.tokens_per_forward == pytest.approx(15 / 12)


def summary_of(name: str, agreement: float, tpf: float, rate: float, errors: int = 0, accuracy: float | None = None):
    return Summary(name, {"mode": "diffusion"}, requests=10, errors=errors, ar_answered=10, compared=10 - errors,
                   agreement=agreement, tokens_per_forward=tpf, tokens_per_second=rate, accuracy=accuracy,
                   references=10 if accuracy is not None else 0)


def test_recommendation_is_the_cheapest_setting_that_meets_the_target():
    summaries = [summary_of("ar", 1.0, 1.0, 100.0, accuracy=0.7), summary_of("spec", 1.0, 3.0, 200.0, accuracy=0.7),
                 summary_of("t=0.9", 0.99, 4.0, 250.0, accuracy=0.68),
                 summary_of("t=0.5", 0.9, 6.0, 400.0, accuracy=0.6),
                 summary_of("steps=1", 0.995, 8.0, 500.0, errors=1, accuracy=0.7),
                 summary_of("b=16", 0.99, 3.5, 300.0, accuracy=0.69)]
    def pick(*args: Any) -> str:
        chosen = recommend(summaries, *args)
        assert chosen is not None
        return chosen.name

    assert pick(0.99, None) == "t=0.9"  # steps=1 failed a request: never recommended
    assert pick(0.99, None, "tokens_per_second") == "b=16"
    assert pick(1.0, None) == "spec"
    assert pick(0.8, None) == "t=0.5"
    assert pick(None, 0.69) == "b=16" and pick(None, 0.6) == "t=0.5" and pick(0.99, 0.69) == "b=16"
    assert recommend(summaries, None, 0.71) is None  # not even ar
    with pytest.raises(ValueError):
        recommend(summaries, 0.99, None, "cheapest")
    # a tie in tokens per forward goes to the higher agreement, then accuracy, then the earlier setting
    tied = [summary_of("a", 0.99, 5.0, 900.0, accuracy=0.6), summary_of("b", 1.0, 5.0, 100.0, accuracy=0.5),
            summary_of("c", 1.0, 5.0, 200.0, accuracy=0.6), summary_of("d", 1.0, 5.0, 300.0, accuracy=0.6)]
    assert getattr(recommend(tied, 0.9, None), "name", None) == "c"


def config_parameter_keys() -> set[str]:
    import re

    return set(re.findall(r'\{ key: "(\w+)"', CONFIG.read_text()))


def test_config_parameters_are_the_server_defaults_of_the_setting():
    assert config_parameters({"mode": "diffusion", "steps": 4}) == (
        {"default_mode": "diffusion", "steps": "4", "threshold": ""}, [])  # empty threshold: fixed steps
    assert config_parameters({"mode": "diffusion", "threshold": 0.7, "block_length": 16}) == (
        {"default_mode": "diffusion", "threshold": "0.7", "block_length": "16"}, [])
    assert config_parameters({"mode": "speculative"}) == ({"default_mode": "speculative"}, [])
    # steps beside a threshold is a pass cap, which the steps parameter does not set
    assert config_parameters({"mode": "diffusion", "threshold": 0.7, "steps": 2}) == (
        {"default_mode": "diffusion", "threshold": "0.7"}, ["steps"])
    # a field the server has no parameter for is sent per request
    remasking = {"mode": "diffusion", "threshold": 0.7, "remask_threshold": 0.3, "max_remasks": 4}
    assert config_parameters(remasking, config_parameter_keys() - {"remask_threshold", "max_remasks"}) == (
        {"default_mode": "diffusion", "threshold": "0.7"}, ["remask_threshold", "max_remasks"])
    assert config_parameters(remasking, None)[0] == {"default_mode": "diffusion", "threshold": "0.7",
                                                     "remask_threshold": "0.3", "max_remasks": "4"}
    # against the project's own config.pbtxt: the default grid's plain settings (no re-masking) are parameters only,
    # and every parameter printed exists
    keys = config_parameter_keys()
    for setting in default_grid():
        parameters, per_request = config_parameters(setting.fields, keys)
        assert set(parameters) <= keys and set(parameters) >= {CONFIG_PARAMETERS[f] for f in setting.fields
                                                               if f not in per_request}, setting
        if "remask_threshold" not in setting.fields:
            assert per_request == [], setting


# --- the command, offline against a scripted client ---------------------------------------------------------------
class ScriptedClient:
    """Answers as a scripted server would: ar and speculative right, threshold 0.5 wrong on '7+8=', steps=1
    refused; counts the requests in flight."""

    def __init__(self, delay: float = 0.02):
        self.delay, self.in_flight, self.most_in_flight = delay, 0, 0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def generate(self, prompt: str, *, timeout: float | None = None, **fields: Any) -> Result:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.calls.append((prompt, fields))
        try:
            time.sleep(self.delay)
            answers = {"12+30=": "42", "7+8=": "15", "upper:ab=": "AB"}
            text = answers[prompt]
            mode = fields.get("mode")
            if fields.get("steps") == 1:
                raise InvalidRequest("steps must be in [2, 32], got 1")
            if fields.get("threshold") == 0.5 and prompt == "7+8=":
                text = "16"
            forwards = {"ar": len(text) + 2, "speculative": 3}.get(mode or "", 2)
            return Result(text, len(text) + 1, forwards, 0.01, 0.01, 1, "stop")
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch):
    client = ScriptedClient()
    monkeypatch.setattr(audit_cli, "connect", lambda args: client)
    parameters = {key: "" for key in config_parameter_keys()}
    monkeypatch.setattr(audit_cli, "server_parameters", lambda args: parameters)
    return client


def scripted_prompts(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "prompts.jsonl", {"prompt": "12+30=", "reference": "42", "scorer": "number"},
                       {"prompt": "7+8=", "reference": "15"},
                       {"messages": [{"role": "user", "content": "upper:ab="}], "reference": "AB"})


GRID = json.dumps([{"mode": "speculative"}, {"mode": "diffusion", "threshold": 0.5},
                   {"mode": "diffusion", "steps": 1}])


def test_the_command_measures_reports_and_recommends(tmp_path, scripted, capsys):
    out = tmp_path / "out"
    status = audit_cli.main(["--url", "127.0.0.1:1", "--prompts", str(scripted_prompts(tmp_path)), "--out", str(out),
                             "--grid", GRID, "--concurrency", "2", "--min-agreement", "0.6", "--max-tokens", "9",
                             "--characters", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert scripted.most_in_flight == 2  # bounded by --concurrency, and used
    assert len(scripted.calls) == 12 and all(f["temperature"] == 0.0 and f["max_tokens"] == 9
                                             for _, f in scripted.calls)
    assert {p for p, f in scripted.calls if f["mode"] == "ar"} == {"12+30=", "7+8=", "upper:ab="}
    result = json.loads((out / "audit.json").read_text())
    settings = {s["name"]: s for s in result["settings"]}
    assert list(settings) == ["ar", "speculative", "diffusion threshold=0.5", "diffusion steps=1"]
    assert result["edit_distance_unit"] == "characters"
    t05 = settings["diffusion threshold=0.5"]
    assert t05["agreement"] == pytest.approx(2 / 3) and t05["hallucination_rate"] == pytest.approx(1 / 3)
    assert t05["mean_edit_distance"] == pytest.approx(1 / 3) and t05["tokens_per_forward"] == pytest.approx(3.0)
    assert settings["speculative"]["agreement"] == 1.0 and settings["speculative"]["tokens_per_forward"] == 1.5
    failed = settings["diffusion steps=1"]
    assert failed["errors"] == failed["requests"] == 3  # reported, the audit went on
    assert failed["error_examples"] == ["InvalidRequest: steps must be in [2, 32], got 1"]
    recommendation = result["recommendation"]
    assert recommendation["setting"] == "diffusion threshold=0.5"  # the most tokens per forward at >= 60 %
    assert recommendation["request_fields"] == {"mode": "diffusion", "threshold": 0.5}
    assert recommendation["config_parameters"] == {"default_mode": "diffusion", "threshold": "0.5"}
    assert recommendation["per_request_fields"] == []
    divergent = result["prompts"][1]["results"]["diffusion threshold=0.5"]
    assert (divergent["text"], divergent["same_as_ar"], divergent["first_difference"], divergent["correct"]) == (
        "16", False, 1, False)
    assert 'request fields: {"mode": "diffusion", "threshold": 0.5}' in printed
    assert '{ key: "default_mode", value: { string_value: "diffusion" } },  # now' in printed  # a list's entries
    assert '{ key: "threshold", value: { string_value: "0.5" } }  # now' in printed
    assert "diffusion steps=1: 3 of 3 requests failed: InvalidRequest: steps must be in [2, 32], got 1" in printed
    report = (out / "audit.md").read_text()
    assert "**Recommended: diffusion threshold=0.5**" in report
    assert ("| 2 | <code>7+8=</code> | <code>15</code> ✓ | <code>16</code> ✗ | character 1 | 1 |" in report), report
    assert "### diffusion threshold=0.5: 1 of 3 answers differ from ar" in report
    assert "### speculative" not in report  # no divergence
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # at the default target only the lossless settings qualify
    assert audit_cli.main(["--prompts", str(scripted_prompts(tmp_path)), "--out", str(out), "--grid", GRID,
                           "--no-progress"]) == 0
    assert json.loads((out / "audit.json").read_text())["recommendation"]["setting"] == "speculative"


def test_remasking_on_an_older_server_or_client_is_reported_as_failed(tmp_path, scripted, monkeypatch):
    """An older server refuses the re-masking inputs (Triton: unexpected inference input); an older client library
    cannot send them: either way that setting fails, the others are measured."""
    generate = ScriptedClient.generate

    def older_server(self, prompt, **fields):
        if "remask_threshold" in fields:
            raise InvalidRequest("[request id: <id_unknown>] unexpected inference input 'remask_threshold' for "
                                 "model 'dlm'")
        return generate(self, prompt, **fields)

    grid = json.dumps([{"mode": "speculative"},
                       {"mode": "diffusion", "threshold": 0.7, "remask_threshold": 0.3, "max_remasks": 4}])
    argv = ["--prompts", str(scripted_prompts(tmp_path)), "--out", str(tmp_path / "out"), "--grid", grid,
            "--no-progress"]
    monkeypatch.setattr(ScriptedClient, "generate", older_server)
    assert audit_cli.main(argv) == 0
    settings = json.loads((tmp_path / "out" / "audit.json").read_text())["settings"]
    assert settings[1]["errors"] == 0 and settings[1]["agreement"] == 1.0
    assert settings[2]["errors"] == 3 and "unexpected inference input 'remask_threshold'" in \
        settings[2]["error_examples"][0]
    calls = len(scripted.calls)
    monkeypatch.setattr(audit_cli, "OPTION_NAMES", audit_cli.OPTION_NAMES - {"remask_threshold", "max_remasks"})
    assert audit_cli.main(argv) == 0
    settings = json.loads((tmp_path / "out" / "audit.json").read_text())["settings"]
    assert settings[2]["errors"] == 3 and settings[2]["error_examples"] == [
        "UnsupportedInput: this client library cannot send the input(s) max_remasks, remask_threshold "
        "(client/request.py Options has no such field)"]
    assert len(scripted.calls) == calls + 6  # ar and speculative only: nothing sent for the setting


def test_the_shipped_prompts_file_is_what_the_script_writes(tmp_path):
    from conftest import load_script

    load_script("audit_prompts").main(["--out", str(tmp_path / "prompts.jsonl")])
    shipped = ROOT / "docs" / "audit" / "prompts.jsonl"
    assert (tmp_path / "prompts.jsonl").read_text() == shipped.read_text()
    prompts = load_prompts(shipped, NO_TEMPLATE)
    assert len(prompts) == 200 and {p.scorer for p in prompts} == {"number", "exact", "regex"}
    assert sum(p.messages is not None for p in prompts) == 12
    from export.tasks import held_out_set

    problems = held_out_set("addition", 150) + held_out_set("upper", 50)
    assert [p.prompt for p in prompts] == [q.prompt for q in problems]
    assert all(p.correct(q.answer) and not p.correct(q.answer + "1") for p, q in zip(prompts, problems))


def test_exit_status_1_when_nothing_meets_the_target(tmp_path, scripted, capsys):
    argv = ["--prompts", str(scripted_prompts(tmp_path)), "--out", str(tmp_path / "out"), "--grid", GRID,
            "--min-accuracy", "1.0", "--no-progress"]
    scripted_answers = ScriptedClient.generate

    def always_wrong(self, prompt, **fields):  # on '7+8=', in every setting
        result = scripted_answers(self, prompt, **fields)
        return Result("0", 2, 3, 0.01, 0.01) if prompt == "7+8=" else result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ScriptedClient, "generate", always_wrong)
        assert audit_cli.main(argv) == 1
    assert "no setting meets the target, not even ar" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["recommendation"] is None


def test_bad_input_and_an_unreachable_server_exit_2_with_a_clear_message(tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", {"prompt": "1+1="},
                      {"prompt": "1+1=", "reference": "2", "scorer": "fuzzy"})
    assert audit_cli.main(["--url", "127.0.0.1:1", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"error: {bad} line 2: unknown scorer 'fuzzy'" in capsys.readouterr().err
    good = write_lines(tmp_path / "good.jsonl", {"prompt": "1+1="})
    for url in ("127.0.0.1:1", "http://127.0.0.1:1"):
        assert audit_cli.main(["--url", url, "--prompts", str(good), "--out", str(tmp_path / "o")]) == 2
        protocol = "http" if url.startswith("http") else "grpc"
        assert f"cannot reach model 'dlm' at {url} over {protocol}" in capsys.readouterr().err
    assert audit_cli.main(["--url", "127.0.0.1:1", "--prompts", str(good), "--grid", '[{"mode": "fast"}]']) == 2
    assert "--grid entry 0: mode 'fast' is unknown" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- end to end against the session's real server -----------------------------------------------------------------
def held_out_prompts(path: Path) -> Path:
    """Six held-out additions (the 7th and 14th of the held-out set diverge from ar in diffusion on the shipped
    miniature, measured with docs/audit/prompts.jsonl) and two upper-casings, one as chat messages."""
    from export.tasks import held_out_set

    additions = [held_out_set("addition", 14)[i] for i in (0, 1, 2, 3, 6, 13)]
    uppers = held_out_set("upper", 2)
    lines: list[Any] = [{"prompt": p.prompt, "reference": p.answer, "scorer": "number"} for p in additions]
    lines += [{"prompt": uppers[0].prompt, "reference": uppers[0].answer},
              {"messages": [{"role": "user", "content": uppers[1].prompt}], "reference": uppers[1].answer}]
    return write_lines(path, *lines)


def agreement(texts: list[str], audit: dict[str, Any]) -> float:
    reference = [p["results"]["ar"]["text"] for p in audit["prompts"]]
    return sum(a == b for a, b in zip(texts, reference)) / len(reference)


@pytest.mark.slow
def test_audit_end_to_end_and_its_recommendation_reproduces_its_agreement(triton, tmp_path):
    from client import GrpcClient
    from triton_server import repository_with, start_server

    prompts, out = held_out_prompts(tmp_path / "prompts.jsonl"), tmp_path / "audit"
    grid = [{"mode": "speculative"}, {"mode": "diffusion", "threshold": 0.5}, {"mode": "diffusion", "steps": 1},
            {"mode": "diffusion", "threshold": 0.9, "block_length": 16}, {"mode": "diffusion", "block_length": 999},
            {"name": "remasking", "mode": "diffusion", "threshold": 0.7, "remask_threshold": 0.3, "max_remasks": 4}]
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    command = [sys.executable, "-m", "client.audit", "--url", f"http://{triton.http_url}", "--prompts", str(prompts),
               "--out", str(out), "--grid", str(tmp_path / "grid.json"), "--min-agreement", "0.5",
               "--concurrency", "4", "--max-tokens", "40"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    audit = json.loads((out / "audit.json").read_text())
    assert (out / "audit.md").is_file() and (out / "audit.png").stat().st_size > 10_000
    assert audit["edit_distance_unit"].startswith("tokens") and audit["server"]["protocol"] == "http"
    settings = {s["name"]: s for s in audit["settings"]}
    assert settings["ar"]["errors"] == 0 and settings["ar"]["accuracy"] is not None
    # speculative is lossless against ar at temperature 0 (DESIGN §7)
    assert settings["speculative"]["agreement"] == 1.0 and settings["speculative"]["errors"] == 0
    assert settings["speculative"]["tokens_per_forward"] > settings["ar"]["tokens_per_forward"]
    refused = settings["diffusion block_length=999"]  # the server refuses it: reported, the audit went on
    assert refused["errors"] == refused["requests"] == 8 and "block_length" in refused["error_examples"][0]
    remasking = settings["remasking"]  # works on a server and client that have it, else it is reported as failed
    assert remasking["errors"] in (0, 8), remasking
    if remasking["errors"]:
        assert any(word in remasking["error_examples"][0] for word in ("remask", "UnsupportedInput")), remasking
    report = (out / "audit.md").read_text()
    for name, setting in settings.items():
        if setting["errors"] == 0:
            texts = [p["results"][name]["text"] for p in audit["prompts"]]
            assert setting["agreement"] == agreement(texts, audit), name
            differ = sum(p["results"][name]["same_as_ar"] is False for p in audit["prompts"])
            assert (f"### {name}: {differ} of 8 answers differ from ar" in report) == (differ > 0), name
    recommendation = audit["recommendation"]
    assert recommendation is not None and recommendation["setting"] != "ar", run.stdout
    chosen = settings[recommendation["setting"]]
    assert recommendation["agreement"] == chosen["agreement"] >= 0.5
    assert recommendation["request_fields_json"] in run.stdout
    recorded = [p["results"][chosen["name"]]["text"] for p in audit["prompts"]]
    sent = [p["prompt"] for p in audit["prompts"]]

    # applied as request fields (over gRPC this time), the recommendation gives the same answers and agreement
    with GrpcClient(triton.grpc_url) as client:
        texts = [client.generate(p, temperature=0.0, max_tokens=40, **recommendation["request_fields"]).text
                 for p in sent]
    assert texts == recorded
    assert agreement(texts, audit) == recommendation["agreement"]

    # applied as config.pbtxt parameters (the names exist: repository_with asserts it), requests that leave the
    # fields out (all but those no parameter sets) decode the same way
    repository = repository_with(tmp_path / "repository", **recommendation["config_parameters"])
    per_request = {k: recommendation["request_fields"][k] for k in recommendation["per_request_fields"]}
    server = start_server(tmp_path / "server.log", repository)
    try:
        with GrpcClient(server.grpc_url) as client:
            defaults = [client.generate(p, max_tokens=40, **per_request).text for p in sent]
    finally:
        server.stop()
    assert defaults == recorded
    assert agreement(defaults, audit) == recommendation["agreement"]
