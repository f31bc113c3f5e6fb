"""What `python -m client.audit` writes into `--out`: the markdown report (the table of settings, the
recommendation, and each setting's divergent answers beside `ar`'s) and the plot (agreement, and tokens/s,
against tokens per forward). `audit.json` itself is written by `client.audit`."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from client.audit_input import setting_name
from client.audit_measures import Summary, eligible, pbtxt_lines

CONTEXT_BEFORE, CONTEXT_AFTER = 40, 80  # characters shown around a long text's first difference


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def excerpt(text: str, at: int | None) -> str:
    """`text` cut around character `at` when it is long, as an HTML code span for a markdown table cell."""
    start = 0 if at is None else max(at - CONTEXT_BEFORE, 0)
    end = len(text) if at is None else min(at + CONTEXT_AFTER, len(text))
    if at is None and len(text) > CONTEXT_BEFORE + CONTEXT_AFTER:
        end = CONTEXT_BEFORE + CONTEXT_AFTER
    shown = ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")
    shown = html.escape(shown).replace("|", "&#124;").replace("\n", "⏎").replace("\r", "")
    return f"<code>{shown}</code>" if shown else "<em>(empty)</em>"


def settings_table(audit: dict[str, Any]) -> list[str]:
    unit = "tokens" if audit["edit_distance_unit"].startswith("tokens") else "characters"
    rows = [
        f"| setting | agreement with ar | edit distance ({unit}, mean / normalized) | accuracy | "
        "hallucination rate | tokens / forward | latency p50 / p99 (ms) | tokens / s | failed requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    recommended = (audit.get("recommendation") or {}).get("setting")
    for s in audit["settings"]:
        name = f"**{s['name']}** (recommended)" if s["name"] == recommended else s["name"]
        edit = ("" if s["mean_edit_distance"] is None else
                f"{s['mean_edit_distance']:.2f} / {s['mean_normalized_edit_distance']:.3f}")
        latency = ("" if s["latency_p50_ms"] is None else
                   f"{s['latency_p50_ms']:.1f} / {s['latency_p99_ms']:.1f}")
        accuracy = "" if s["accuracy"] is None else f"{_percent(s['accuracy'])} of {s['references']}"
        rows.append(f"| {name} | {_percent(s['agreement'])} | {edit} | {accuracy} | "
                    f"{_percent(s['hallucination_rate'])} | {_number(s['tokens_per_forward'])} | {latency} | "
                    f"{_number(s['tokens_per_second'], 1)} | {s['errors']} of {s['requests']} |")
    return rows


def recommendation_lines(audit: dict[str, Any]) -> list[str]:
    target = audit["target"]
    wanted = []
    if target["min_agreement"] is not None:
        wanted.append(f"agreement with ar ≥ {target['min_agreement']:.1%}")
    if target["min_accuracy"] is not None:
        wanted.append(f"accuracy ≥ {target['min_accuracy']:.1%}")
    picked = "most tokens per forward" if target["pick"] == "tokens_per_forward" else "highest tokens/s"
    lines = [f"Target: {' and '.join(wanted)}, and an answer to every prompt ar answered; among the settings that "
             f"meet it, the one with the {picked}."]
    recommendation = audit.get("recommendation")
    if recommendation is None:
        lines += ["", "**No setting meets the target** (not even `ar`): see the table for how close each came."]
        return lines
    lines += ["", f"**Recommended: {recommendation['setting']}** — {recommendation['summary']}", "",
              "Request fields:", "", "```json", recommendation["request_fields_json"], "```", "",
              "or as the server's defaults, these entries of `config.pbtxt`'s `parameters` list (replacing those "
              "with the same keys; requests that leave these fields out then decode this way):", "", "```"]
    lines += pbtxt_lines(recommendation["config_parameters"]) + ["```"]
    if recommendation["per_request_fields"]:
        lines += ["", f"No `config.pbtxt` parameter of this server sets "
                      f"{', '.join(f'`{f}`' for f in recommendation['per_request_fields'])}: send "
                      f"{'it' if len(recommendation['per_request_fields']) == 1 else 'them'} with each request."]
    return lines


def divergences(audit: dict[str, Any], limit: int) -> list[str]:
    unit = "token" if audit["edit_distance_unit"].startswith("tokens") else "character"
    lines: list[str] = []
    for s in audit["settings"]:
        if s["name"] == "ar":
            continue
        rows = []
        for p in audit["prompts"]:
            r = p["results"].get(s["name"])
            ar = p["results"]["ar"]
            if r is None or r["error"] is not None or ar["error"] is not None or r["same_as_ar"]:
                continue
            where = f"character {r['first_difference']}"
            if unit == "token":
                where += f", token {r['first_difference_unit']}"
            mark = {True: " ✓", False: " ✗", None: ""}
            rows.append(f"| {p['line']} | {excerpt(p['prompt'], None)} | "
                        f"{excerpt(ar['text'], r['first_difference'])}{mark[ar['correct']]} | "
                        f"{excerpt(r['text'], r['first_difference'])}{mark[r['correct']]} | {where} | "
                        f"{r['edit_distance']} |")
        if not rows:
            continue
        lines += ["", f"### {s['name']}: {len(rows)} of {s['compared']} answers differ from ar", ""]
        if len(rows) > limit:
            lines += [f"The first {limit} shown; audit.json holds them all.", ""]
        lines += [f"| line | prompt | ar | {html.escape(s['name'])} | first difference (offset) | edit distance "
                  f"({unit}s) |", "| --- | --- | --- | --- | --- | --- |"] + rows[:limit]
    return lines


def markdown(audit: dict[str, Any], divergence_limit: int = 20) -> str:
    server = audit["server"]
    failed = [s for s in audit["settings"] if s["errors"]]
    lines = [
        "# Decoding audit", "",
        f"Server `{server['url']}` ({server['protocol']}, model `{server['model']}`), {audit['prompts_count']} "
        f"prompts from `{audit['prompts_file']}`, {len(audit['settings'])} settings at temperature 0 "
        f"(ar is the reference), concurrency {audit['concurrency']}, {audit['seconds']:.1f} s in all, "
        f"{audit['started']}.",
        "",
        f"Edit distance is counted in {audit['edit_distance_unit']}. Tokens per forward: the server's tokens over "
        "its forward passes after the prefill. Tokens/s: a setting's tokens over its wall time at this "
        "concurrency. The hallucination rate: the share of prompts with a reference that ar answers right and the "
        "setting wrong.",
        "",
        *recommendation_lines(audit),
        "",
        "## Settings",
        "",
        *settings_table(audit),
    ]
    if failed:
        lines += ["", "## Failed requests", ""]
        for s in failed:
            lines.append(f"- **{s['name']}**: {s['errors']} of {s['requests']} failed: "
                         + "; ".join(f"`{m}`" for m in s["error_examples"]))
    target = audit["target"]
    misses = [f"- {s['name']}: {why}" for s in audit["settings"] if s["errors"] < s["requests"]
              and (why := eligible(Summary(**s), target["min_agreement"], target["min_accuracy"])) is not None]
    lines += ["", "## Settings that miss the target", "", *(misses or ["None."])]
    lines += ["", "## Divergent answers", "",
              "Each answer that differs from ar's, beside it (✓ / ✗: right / wrong by the prompt's scorer), cut "
              "around the first difference."]
    lines += divergences(audit, divergence_limit) or ["", "None: every setting gave ar's answers."]
    return "\n".join(lines) + "\n"


ABBREVIATIONS = {"threshold": "t", "steps": "steps", "block_length": "block", "remask_threshold": "remask",
                 "max_remasks": "max"}
COLOURS = {"ar": "black", "speculative": "tab:green", "steps": "tab:orange", "block_length": "tab:purple",
           "remask_threshold": "tab:brown", "threshold": "tab:blue"}


def short_label(setting: dict[str, Any]) -> str:
    """A point's label: 'ar', 'speculative', 't=0.7', 'steps=4', 't=0.7 remask=0.3 max=8' (or the grid's name)."""
    fields = setting["fields"]
    if setting["name"] != "ar" and setting["name"] != setting_name(fields):
        return setting["name"]  # a name the grid gave
    parts = [] if fields.get("mode", "diffusion") == "diffusion" else [str(fields.get("mode"))]
    parts += [f"{ABBREVIATIONS.get(k, k)}={v}" for k, v in fields.items() if k != "mode"]
    return " ".join(parts) or "diffusion"


def colour(setting: dict[str, Any]) -> str:
    fields = setting["fields"]
    if fields.get("mode") in ("ar", "speculative"):
        return COLOURS[fields["mode"]]
    return next((COLOURS[k] for k in ("remask_threshold", "steps", "block_length") if k in fields), "tab:blue")


def plot(audit: dict[str, Any], path: Path) -> None:
    """Agreement and tokens/s against tokens per forward, one point per setting (settings that land on the same
    point share one label); the recommended one ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in audit["settings"] if s["tokens_per_forward"] is not None]
    recommended = (audit.get("recommendation") or {}).get("setting")
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    for axis, key, label in ((left, "agreement", "agreement with ar"), (right, "tokens_per_second", "tokens / s")):
        points: dict[tuple[float, float], list[str]] = {}
        for s in settings:
            if s[key] is None:
                continue
            x, y = s["tokens_per_forward"], s[key]
            axis.scatter(x, y, s=36, color=colour(s), zorder=3)
            if s["name"] == recommended:
                axis.scatter(x, y, s=160, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4)
            points.setdefault((round(x, 2), round(y, 3 if key == "agreement" else 0)), []).append(short_label(s))
        for (x, y), labels in points.items():
            text = "\n".join(", ".join(labels[i:i + 3]) for i in range(0, len(labels), 3))
            axis.annotate(text, (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
        axis.set_xlabel("tokens per forward (after the prefill)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if audit["target"]["min_agreement"] is not None:
        left.axhline(audit["target"]["min_agreement"], color="tab:red", linestyle="--", linewidth=1,
                     label=f"target {audit['target']['min_agreement']:.0%}")
        left.legend(loc="lower left")
    from matplotlib.lines import Line2D

    kinds = {"ar": "ar", "speculative": "speculative", "threshold": "threshold", "steps": "fixed steps",
             "block_length": "block length", "remask_threshold": "re-masking"}
    shown = {colour(s) for s in settings}
    right.legend(handles=[Line2D([], [], marker="o", linestyle="", color=COLOURS[k], label=label)
                          for k, label in kinds.items() if COLOURS[k] in shown], loc="best", fontsize=8)
    left.set_title("agreement with ar")
    right.set_title(f"tokens/s through the server at concurrency {audit['concurrency']}")
    figure.suptitle(f"Decoding audit of {audit['server']['url']}: {audit['prompts_count']} prompts"
                    + (f"; recommended: {recommended} (red ring)" if recommended else "; no setting meets the target"))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
