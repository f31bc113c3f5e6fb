"""Cancelled gRPC streams, back to back, against the session's server (scripts/cancel_stress.py): every request
answers and the server stays up. Before `cancelled_final_delay`, Triton 2.51 crashed here now and then
(triton-inference-server/server#8078); the long comparison, with and without the delay, is in the README."""

from __future__ import annotations

from conftest import load_script


def test_cancelled_streams_back_to_back_leave_the_server_serving(triton):
    stress = load_script("cancel_stress")
    report = stress.run(triton.grpc_url, rounds=100, server_alive=lambda: triton.process.poll() is None)
    assert report["errors"] == 0, report["first_errors"]
    assert report["server_died_at_round"] is None
    assert report["rounds"] == 100


def test_the_log_counts_find_the_crashing_path():
    log = "\n".join([
        'I1127 infer_handler.h:850] "Cancellation notification received for ModelStreamInferHandler, rpc_ok=1, '
        'context 0, 0 step WRITTEN"',
        'I1127 infer_handler.h:850] "Cancellation notification received for ModelStreamInferHandler, rpc_ok=1, '
        'context 0, 0 step ISSUED"',
        'I1127 infer_handler.h:875] "Completing cancellation for ModelStreamInferHandler, rpc_ok=0, context 0, 0 '
        'step CANCELLED"',
        "Signal (11) received.",
    ])
    assert load_script("cancel_stress").log_counts(log) == {
        "cancellations_seen": 2, "cancelled_during_a_write": 1, "crashing_path": 1, "server_signals": 1}


def test_the_signal_watch_sees_a_signal_written_after_its_last_look(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("I1127 started\n" * 100)
    signalled = load_script("cancel_stress").SignalWatch(log)
    assert not signalled()
    with open(log, "a") as f:
        f.write("Signal (11) received.\n")
    assert signalled() and signalled()
