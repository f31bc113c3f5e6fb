"""scripts/bench_prefix.py on a tiny run over the miniature: both parts, the targets and the JSON. Its timings are not
judged here (time limits belong in benchmarks, not in tests); what prefix caching guarantees whatever the timing:
the request sharing a prefix reuses all of it, the one sharing nothing reuses (almost) nothing, a conversation's
later turns prefill only what is new, and the answers are the same with reuse on and off."""

from __future__ import annotations

import json

from conftest import load_script
from dlm.kv_cache import MIN_COPY
from triton_server import prepare_repository


def test_bench_prefix_writes_its_figures(tmp_path):
    prepare_repository()
    bench = load_script("bench_prefix")
    out = tmp_path / "bench"
    record = bench.main(["--artifact", "miniature", "--prefix", "300", "2000", "--repeats", "2", "--turns", "3",
                         "--conversations", "2", "--out", str(out)])
    assert json.loads((out / "bench_prefix.json").read_text()) == json.loads(json.dumps(record))
    (a,) = record["first_block"]  # 2000 tokens do not fit the miniature's 1024 positions: skipped
    assert a["prefix_tokens"] == 300 and len(a["cold_ms"]) == len(a["warm_ms"]) == 2 and a["ratio"] > 0
    assert a["cached_tokens_warm_min"] == 300 and a["cached_tokens_cold_max"] < MIN_COPY
    (b,) = record["chat"]
    assert b["same_answers"] and b["prefilled_off"] == b["prompt_tokens"] > b["prefilled_on"] > 0
    assert {t["met"] for t in record["targets"] if "same answers" in t["target"]} == {True}
    assert record["machine"]["cores"] and record["settings"]["prefill_chunk"] == 64
