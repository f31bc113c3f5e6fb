"""The measures of `python -m client.audit`: how each setting's answers compare with `ar`'s, how fast it ran, and
which setting is the cheapest that meets the target.

- agreement: the share of prompts whose text equals `ar`'s exactly (over the prompts both answered);
- edit distance: Levenshtein distance between the two texts, in the server's tokens (the checkpoint's tokenizer)
  or in characters when no tokenizer is given; its mean, and its mean over the longer text's length;
- accuracy against the references (where given), and the parallel-hallucination rate: the share of the prompts
  with a reference that `ar` answers right and the setting wrong;
- tokens per forward: the server's `num_tokens` over its `num_forwards` after the prefill, summed over the
  prompts (as the project counts: `Result.tokens_per_forward`, `export.evaluate`);
- latency p50 / p99 of a request through the server, and tokens/s: the setting's tokens over its wall time at the
  audit's concurrency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from client.audit_input import AuditPrompt, Setting

PICKS = ("tokens_per_forward", "tokens_per_second")
# config.pbtxt parameter that gives each request field its server-wide default (model_repository/dlm/config.pbtxt)
CONFIG_PARAMETERS = {"mode": "default_mode", "block_length": "block_length", "threshold": "threshold",
                     "steps": "steps", "remask_threshold": "remask_threshold", "max_remasks": "max_remasks"}


@dataclass
class Outcome:
    """One request of one setting: the server's answer or its error."""

    text: str | None = None
    num_tokens: int = 0
    num_forwards: int = 0
    latency: float = 0.0
    finish_reason: str = ""
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Comparison:
    """One prompt's answer in a setting against `ar`'s."""

    same: bool
    edit_distance: int
    length: int  # units of the longer of the two texts
    first_difference: int | None  # character offset of the first difference (None when the texts are equal)
    first_difference_unit: int | None  # the same in edit-distance units
    correct: bool | None  # by the prompt's scorer; None without a reference


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one unit) between two sequences of integers
    (token ids or code points). One numpy row update per unit of the shorter sequence: the row's left-to-right
    dependency, current[j] = min(candidate[j], current[j - 1] + 1), is a running minimum of candidate[k] - k."""
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    rows, columns = np.asarray(a[start:end_a], dtype=np.int64), np.asarray(b[start:end_b], dtype=np.int64)
    if len(rows) > len(columns):
        rows, columns = columns, rows
    if not len(rows):
        return len(columns)
    offsets = np.arange(len(columns) + 1)
    previous = offsets.copy()
    candidate = np.empty_like(previous)
    for i, unit in enumerate(rows, start=1):
        candidate[0] = i
        np.minimum(previous[1:] + 1, previous[:-1] + (columns != unit), out=candidate[1:])
        previous = np.minimum.accumulate(candidate - offsets) + offsets
    return int(previous[-1])


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first index where the sequences differ (the shorter one's length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


Units = Callable[[str], Sequence[int]]  # a text as the units edit distance counts: token ids or code points


def compare(prompt: AuditPrompt, reference: str, text: str, units: Units) -> Comparison:
    ref_units, units_ = units(reference), units(text)
    return Comparison(
        same=text == reference, edit_distance=edit_distance(ref_units, units_),
        length=max(len(ref_units), len(units_)), first_difference=first_difference(reference, text),
        first_difference_unit=first_difference(ref_units, units_), correct=prompt.correct(text),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


@dataclass
class Summary:
    """One setting's measures over the prompts."""

    name: str
    fields: dict[str, Any]
    requests: int
    errors: int
    error_examples: list[str] = field(default_factory=list)  # distinct messages, the first few
    ar_answered: int = 0  # prompts ar answered (the others are compared in no setting)
    compared: int = 0  # prompts both ar and the setting answered
    agreement: float | None = None
    mean_edit_distance: float | None = None
    mean_normalized_edit_distance: float | None = None
    references: int = 0  # compared prompts with a reference
    accuracy: float | None = None
    hallucinations: int | None = None
    hallucination_rate: float | None = None
    tokens: int = 0
    forwards_after_prefill: int = 0
    tokens_per_forward: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    tokens_per_second: float | None = None
    wall_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.errors == self.requests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(setting: Setting, prompts: Sequence[AuditPrompt], outcomes: Sequence[Outcome],
              reference: Sequence[Outcome], comparisons: Sequence[Comparison | None], wall_seconds: float) -> Summary:
    """The measures of `setting`; `comparisons[i]` is None where ar or the setting failed on prompt i."""
    errors = [o for o in outcomes if not o.ok]
    examples: list[str] = []
    for o in errors:
        message = f"{o.error_type}: {o.error}"
        if message not in examples and len(examples) < 3:
            examples.append(message)
    summary = Summary(setting.name, dict(setting.fields), len(outcomes), len(errors), examples,
                      ar_answered=sum(r.ok for r in reference), wall_seconds=wall_seconds)
    done = [o for o in outcomes if o.ok]
    if done:
        summary.tokens = sum(o.num_tokens for o in done)
        summary.forwards_after_prefill = sum(max(o.num_forwards - 1, 0) for o in done)
        summary.tokens_per_forward = summary.tokens / max(summary.forwards_after_prefill, 1)
        latencies = [o.latency * 1000.0 for o in done]
        summary.latency_p50_ms, summary.latency_p99_ms = percentile(latencies, 50), percentile(latencies, 99)
        summary.tokens_per_second = summary.tokens / wall_seconds if wall_seconds > 0 else None
    pairs = [(p, c, r) for p, c, r in zip(prompts, comparisons, reference) if c is not None]
    if pairs:
        summary.compared = len(pairs)
        summary.agreement = sum(c.same for _, c, _ in pairs) / len(pairs)
        summary.mean_edit_distance = sum(c.edit_distance for _, c, _ in pairs) / len(pairs)
        summary.mean_normalized_edit_distance = sum(c.edit_distance / max(c.length, 1) for _, c, _ in pairs) / len(
            pairs)
        scored = [(p.correct(r.text or ""), c.correct) for p, c, r in pairs if c.correct is not None]
        summary.references = len(scored)
        if scored:
            summary.accuracy = sum(bool(right) for _, right in scored) / len(scored)
            if not setting.is_reference:
                summary.hallucinations = sum(bool(ar_right) and not right for ar_right, right in scored)
                summary.hallucination_rate = summary.hallucinations / len(scored)
    return summary


def eligible(summary: Summary, min_agreement: float | None, min_accuracy: float | None) -> str | None:
    """Why `summary` cannot be recommended, or None when it meets the target. A setting must answer every prompt
    that ar answered (a prompt ar failed on is compared nowhere)."""
    if not summary.ar_answered:
        return "ar answered no prompt"
    if summary.compared < summary.ar_answered:
        return (f"{summary.ar_answered - summary.compared} of the {summary.ar_answered} prompts ar answered "
                f"failed")
    if min_agreement is not None and (summary.agreement or 0.0) < min_agreement:
        return f"agreement {summary.agreement:.1%} < {min_agreement:.1%}"
    if min_accuracy is not None:
        if summary.accuracy is None:
            return "no prompt with a reference"
        if summary.accuracy < min_accuracy:
            return f"accuracy {summary.accuracy:.1%} < {min_accuracy:.1%}"
    return None


def recommend(summaries: Sequence[Summary], min_agreement: float | None, min_accuracy: float | None,
              pick: str = "tokens_per_forward") -> Summary | None:
    """The cheapest setting that meets the target (`ar` included, so one exists whenever ar meets it): the most
    tokens per forward (or tokens/s); on a tie the higher agreement, then the higher accuracy, then the earlier in
    the grid (so a tie in tokens per forward is never settled by the noise in tokens/s)."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    candidates = [(i, s) for i, s in enumerate(summaries) if eligible(s, min_agreement, min_accuracy) is None]
    if not candidates:
        return None

    def key(item: tuple[int, Summary]) -> tuple[float, float, float, int]:
        i, s = item
        primary = s.tokens_per_forward if pick == "tokens_per_forward" else s.tokens_per_second
        return (primary or 0.0, s.agreement or 0.0, s.accuracy or 0.0, -i)

    return max(candidates, key=key)[1]


def config_parameters(fields: dict[str, Any],
                      available: set[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The config.pbtxt parameters that make `fields` the server's defaults (a request that sends none of them then
    decodes as the setting did), and the fields no parameter can set, which each request must send. `available`:
    the parameters the server's model has (None: not known, all of CONFIG_PARAMETERS assumed).

    A fixed-steps setting also clears `threshold` (empty: fixed steps). `steps` beside a `threshold` caps each
    block's passes; the `steps` parameter is the default for requests without a threshold only, so that cap is
    sent per request."""
    parameters, per_request = {}, []
    for name, value in fields.items():
        key = CONFIG_PARAMETERS.get(name)
        cap = name == "steps" and "threshold" in fields
        if key is None or cap or (available is not None and key not in available):
            per_request.append(name)
        else:
            parameters[key] = str(value)
    if fields.get("mode", "diffusion") == "diffusion" and "steps" in fields and "threshold" not in fields:
        parameters["threshold"] = ""
    return parameters, per_request


def pbtxt_lines(parameters: dict[str, str]) -> list[str]:
    """The entries of config.pbtxt's `parameters [...]` list, comma-separated as the list needs."""
    entries = [f'{{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()]
    return [entry + ("," if i < len(entries) - 1 else "") for i, entry in enumerate(entries)]
