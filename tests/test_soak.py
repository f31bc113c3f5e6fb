"""A short soak (scripts/soak.py) against the session's server: mixed modes, streamed and not, some cancelled
mid-stream; no valid request fails and every slot is free once the load stops. The 10-minute figures are in
the README."""

from __future__ import annotations

from conftest import load_script


def test_short_soak_has_no_errors_and_frees_every_slot(triton):
    soak = load_script("soak")
    report = soak.run(triton.grpc_url, triton.metrics_url, duration=15, concurrency=8, window=5,
                      cancel_every=3, server_pid=triton.process.pid)
    assert report["errors"] == 0, report["error_messages"]
    assert report["completed"] > 20 and report["cancelled"] > 0
    assert report["live_slots_after"] == 0
    # 15 s is too short for the 5 % target (allocators still warm up); a gross leak would still show
    assert report["rss_growth"] < 0.5, report["rss_by_window"]
    assert soak.missed_targets(report, rss_limit=0.5) == []
