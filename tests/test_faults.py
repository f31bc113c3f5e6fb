"""Faults and exposure against real tritonservers started for each case: SIGTERM under load, broken artifacts,
a full queue, and the admin endpoints behind a key."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from triton_server import (ENDLESS_PROMPT, ENDLESS_TOKENS, REPOSITORY, grpc_generate, http_post, repository_with,
                           start_server)

ENGINE = REPOSITORY / "dlm" / "1" / "engine"
TOKENIZER = REPOSITORY / "dlm" / "1" / "tokenizer"
SHORT = "4821+377="


def outcome(function, *args, **kwargs) -> str:
    """'ok' or the error message: every request must end one way or the other."""
    try:
        function(*args, **kwargs)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return str(e)


def model_state(server) -> tuple[bool, str]:
    """Whether `dlm` is ready, and the reason the repository index gives for its state."""
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/dlm/ready", timeout=5) as r:
            ready = r.status == 200
    except urllib.error.HTTPError:
        ready = False
    status, body = http_post(server.http_url, "/v2/repository/index", {})
    entry = next(m for m in json.loads(body) if m["name"] == "dlm")
    return ready, entry.get("reason", "")


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_and_exits_in_time(tmp_path):
    # 40 requests for 16 slots, no drain time in the model: some are still queued or running at SIGTERM
    server = start_server(tmp_path / "server.log", repository_with(tmp_path / "repository", drain_seconds="0"))
    with ThreadPoolExecutor(40) as pool:
        futures = [
            pool.submit(outcome, grpc_generate, server.grpc_url, "upper:abcdefghijklmnopqrstuvwxyz0123456789=",
                        mode=("ar", "diffusion", "speculative")[i % 3], max_tokens=48, stream=i % 2 == 0,
                        timeout=60)
            for i in range(40)
        ]
        time.sleep(0.5)
        start = time.monotonic()
        code = server.stop(timeout=60)
        stopped_in = time.monotonic() - start
        results = [f.result(timeout=90) for f in futures]  # none hangs
    assert stopped_in < 30, f"tritonserver took {stopped_in:.0f} s to stop"
    assert code == 0, server.log_tail()
    assert len(results) == 40
    # Triton holds the unload until the decoupled requests have sent their final response, so they normally all
    # finish; any that does not must say why
    for r in (r for r in results if r != "ok"):
        assert "shut down before this request finished" in r or "unavailable" in r.lower(), r


@pytest.mark.parametrize("fault", ["missing", "corrupt", "mismatched"])
def test_broken_artifact_leaves_the_model_unready_with_the_reason(tmp_path, fault):
    artifact, tokenizer = tmp_path / "engine", tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER, tokenizer)
    if fault == "missing":
        artifact.mkdir()
        expected = "no model.plan, model.onnx, model.pt2 in"
    else:
        shutil.copytree(ENGINE, artifact)
    if fault == "corrupt":
        with open(artifact / "model.onnx", "r+b") as f:
            f.seek(200)
            f.write(b"\x00" * 64)
        expected = "model.onnx was changed after it was built"
    if fault == "mismatched":
        config = json.loads((tokenizer / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (tokenizer / "config.json").write_text(json.dumps(config))
        expected = "other model config: num_hidden_layers 6 (artifact) != 7 (this model)"
    repository = repository_with(tmp_path / "repository", artifact=str(artifact), tokenizer=str(tokenizer))
    server = start_server(tmp_path / "server.log", repository, ready_path="/v2/health/live")
    try:
        deadline = time.monotonic() + 60
        ready, reason = model_state(server)
        while not reason and time.monotonic() < deadline:  # loading may still be under way
            time.sleep(0.3)
            ready, reason = model_state(server)
        assert not ready
        assert expected in reason, reason
        assert expected in server.log_tail(200)
    finally:
        server.stop()


def test_full_queue_is_refused_with_a_clear_error_and_accepted_requests_finish(tmp_path):
    repository = repository_with(tmp_path / "repository", max_live="1", max_queue="1")
    server = start_server(tmp_path / "server.log", repository)
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(
                lambda _: outcome(grpc_generate, server.grpc_url, ENDLESS_PROMPT, mode="ar", max_tokens=ENDLESS_TOKENS),
                range(6)))
        refused = [r for r in results if r != "ok"]
        assert refused and all("the queue is full (1 requests waiting, 1 running)" in r for r in refused), results
        assert results.count("ok") >= 2  # the one running and the one waiting
        assert server.metrics()['dlm_requests_total{mode="ar",outcome="rejected"}'] == len(refused)
        grpc_generate(server.grpc_url, SHORT, mode="ar")  # and the server still serves
    finally:
        server.stop()


def test_admin_endpoints_need_the_key(tmp_path):
    server = start_server(tmp_path / "server.log", admin_key="s3cret")
    try:
        index = f"http://{server.http_url}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(index, data=b"{}"), timeout=5)
        assert refused.value.code in (401, 403)
        for path in ("/v2/logging", "/v2/trace/setting"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5)
        keyed = urllib.request.Request(index, data=b"{}", headers={"admin-key": "s3cret"})
        with urllib.request.urlopen(keyed, timeout=5) as r:
            assert r.status == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(Exception, match="(?i)unauthenticated|restricted|admin-key"):
            client.get_model_repository_index()
        assert client.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": "s3cret"}) is not None
        assert grpc_generate(server.grpc_url, SHORT, mode="ar")[0]["text"]  # inference needs no key
    finally:
        server.stop()
