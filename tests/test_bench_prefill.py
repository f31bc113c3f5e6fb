"""scripts/bench_prefill.py on a tiny run: both parts, the targets and the JSON. Its timings are not judged here
(time limits belong in benchmarks, not in tests); what the planner guarantees whatever the timing is: no pass of
the mixed workload more than 25 % padding, and one pass per step padding at least as much as the planner's passes."""

from __future__ import annotations

import json

from conftest import load_script
from triton_server import prepare_repository


def test_bench_prefill_writes_its_figures(tmp_path):
    prepare_repository()
    bench = load_script("bench_prefill")
    out = tmp_path / "bench"
    record = bench.main(["--max-num-tokens", "512", "--prefill-chunk", "64", "--repeats", "2", "--requests", "8",
                         "--out", str(out)])
    assert json.loads((out / "bench_prefill.json").read_text()) == json.loads(json.dumps(record))
    a, chunked = record["first_block"]
    assert a["max_num_tokens"] == a["chunk"] == 512 and a["prefill_passes"] == 2 and a["long_prompt_tokens"] == 991
    assert chunked["max_num_tokens"] == 512 and chunked["chunk"] == 64 and chunked["prefill_passes"] == 16
    assert len(a["idle_ms"]) == len(a["busy_ms"]) == 2 and a["idle_p50_ms"] > 0 and a["ratio"] > 0
    (b,) = record["padding"]
    before, after = b["before"], b["after"]
    assert b["requests"] == 8 and before["passes"] == b["steps"] <= after["passes"]
    assert before["real_tokens"] == after["real_tokens"] > 0  # the same rows, grouped two ways
    assert after["pass_share_max"] <= 0.25 and after["passes_over_target"] == 0
    assert before["padding_tokens"] >= after["padding_tokens"]
    assert {t["met"] for t in record["targets"] if t["target"].startswith("padded")} == {True}
    assert record["machine"]["cores"] and record["settings"]["shipped_max_num_tokens"] == 512
    assert record["settings"]["shipped_prefill_chunk"] == 64
