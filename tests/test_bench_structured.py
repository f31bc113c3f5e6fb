"""scripts/bench_structured.py on its quick run (--quick: the miniature exported with --structured, 2 prompts, 1
repeat): every mode with no constraint, any JSON object and the 3-key schema, the figures and the JSON. Its timings
are not judged here (time limits belong in benchmarks, not in tests); what holds whatever the timing: every
constrained output is accepted by its grammar, every schema answer is complete and validates, diffusion keeps at
least 2 tokens per forward under the schema, and the grammar was timed where it ran."""

from __future__ import annotations

import json

from conftest import load_script
from triton_server import prepare_repository


def test_bench_structured_writes_its_figures(tmp_path):
    prepare_repository()
    bench = load_script("bench_structured")
    out = tmp_path / "bench"
    record = bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads((out / "bench_structured.json").read_text()) == json.loads(json.dumps(record))
    rows = {(r["mode"], r["constraint"]): r for r in record["rows"]}
    constraints = ["none, version-2 graph", "none", "json", "schema"]
    assert set(rows) == {(m, c) for m in ("ar", "speculative", "diffusion") for c in constraints}
    for (mode, constraint), r in rows.items():
        assert r["artifact"] == "miniature" and r["prompts"] == 2 and len(r["tokens_per_s"]) == 1
        assert r["tokens_per_forward"] > 0 and r["tokens_per_s_p50"] > 0 and r["ms_per_pass"] > 0
        assert r["tokens_per_forward_ratio"] > 0 and r["tokens_per_s_ratio"] > 0
        if constraint.startswith("none"):
            assert "valid_share" not in r and r["grammar_ms_per_pass"] == 0 and r["mask_calls_per_pass"] == 0
            assert r["graph_version"] == (2 if constraint != "none" else 3)
        else:
            assert r["valid_share"] == 1.0, r["texts"]  # accepted by the grammar: complete, or a prefix at max_tokens
            assert r["grammar_ms_per_pass"] > 0 and r["mask_calls_per_pass"] >= 1 and r["replayed_mask_us_p50"] > 0
    for mode in ("ar", "speculative", "diffusion"):
        schema = rows[(mode, "schema")]
        assert schema["parsed_share"] == 1.0 and schema["finish"] == {"eos": 2}, schema["texts"]
        for text in schema["texts"]:
            assert set(json.loads(text)) == {"sum", "ok", "tag"}
        assert rows[(mode, "none")]["tokens_per_forward"] == rows[(mode, "none, version-2 graph")]["tokens_per_forward"]
    assert rows[("ar", "schema")]["texts"] == rows[("speculative", "schema")]["texts"]  # constrained spec == ar
    assert rows[("diffusion", "schema")]["tokens_per_forward"] >= 2.0
    assert {t["met"] for t in record["targets"]} == {True} and len(record["targets"]) == 3
    assert record["machine"]["cores"] and record["settings"]["prefix_caching"] is False
