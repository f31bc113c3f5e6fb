"""A replica speaks the model-server protocol (Gateway API Inference Extension, proposal 003), checked through a real
tritonserver with the gateway beside it, as in a pod of the Helm chart:

- the gauges the llm-d router reads are on the gateway's /metrics, typed `gauge`, and mean what they say under load:
  a server with 2 slots driven past them shows waiting > 0 while running = 2, the KV-cache usage rises as the
  running requests' context grows (and equals the positions they hold / the slots' capacity), and all three are back
  to 0 afterwards;
- the router's configuration the chart ships (its EndpointPickerConfig, engine type `dlm`) names exactly metrics
  the gateway exports, as gauges, in a form the router's parser takes;
- with Triton gone the gauges disappear (the router then treats the replica as saturated), /health answers 503 and
  a request 503.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from client.replica_gauges import CACHE_BLOCK_SIZE, CACHE_BLOCK_TOKENS, CACHE_NUM_BLOCKS, render
from dlm.text import TextCodec
from triton_server import (ENDLESS_PROMPT, REPOSITORY, Gateway, TritonServer, prepare_repository, repository_with)

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 2
WAITING, RUNNING, KV_USAGE = "dlm:num_requests_waiting", "dlm:num_requests_running", "dlm:kv_cache_usage_perc"
PROMPT = ENDLESS_PROMPT * 60  # 120 characters: a context that starts well above 0 and grows by one per pass
TOKENS = 800  # about 3 s per pair of requests here: many scrapes while 2 run and 2 wait


def scrape(url: str) -> tuple[dict[str, float], dict[str, str]]:
    """The unlabelled samples of a Prometheus text page, and each family's declared type."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples, types


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """A tritonserver with 2 slots and the gateway beside it (the chart's sidecar: --triton on loopback, Triton's
    metrics port read for the gauges)."""
    prepare_repository()
    work = tmp_path_factory.mktemp("replica")
    repository = repository_with(work / "repository", max_live=str(SLOTS), runtime_threads="1",
                                 runtime_spin="false")
    server = TritonServer(repository, work / "server.log")
    gateway = None
    try:
        server.wait_ready(timeout=180)
        gateway = Gateway(server.grpc_url, work / "gateway.log", triton_metrics=server.metrics_url).wait_ready()
        yield server, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        server.kill()


def test_the_gauges_from_triton_samples():
    """The rendering on its own: the three gauges from Triton's, the prefix cache's only when it is on, nothing
    but the `up` gauge at 0 when Triton could not be read."""
    triton = {"dlm_queue_depth": 3.0, "dlm_live_slots": 16.0, "dlm_kv_cache_usage": 0.25, "dlm_slots": 16.0,
              "dlm_prefix_cache_capacity_positions": 16 * 1024.0}
    lines = render(triton).splitlines()
    assert {WAITING + " 3", RUNNING + " 16", KV_USAGE + " 0.25", "dlm_gateway_triton_metrics_up 1"} <= set(lines)
    assert f"{CACHE_BLOCK_SIZE} {CACHE_BLOCK_TOKENS}" in lines and f"{CACHE_NUM_BLOCKS} 256" in lines
    assert all(f"# TYPE {name} gauge" in lines for name in (WAITING, RUNNING, KV_USAGE, CACHE_BLOCK_SIZE))
    off = render({**triton, "dlm_prefix_cache_capacity_positions": 0.0})
    assert CACHE_BLOCK_SIZE not in off and CACHE_NUM_BLOCKS not in off and WAITING in off
    assert render(None).splitlines()[-1] == "dlm_gateway_triton_metrics_up 0" and WAITING not in render(None)


@pytest.mark.slow  # the module's tritonserver takes about 10 s to start
def test_the_gauges_are_served_as_gauges_and_idle_at_zero(replica):
    server, gateway = replica
    samples, types = scrape(gateway.url)
    assert samples["dlm_gateway_triton_metrics_up"] == 1
    for name in (WAITING, RUNNING, KV_USAGE):
        assert types[name] == "gauge", name
        assert samples[name] == 0, name
    triton = server.metrics()
    assert triton["dlm_slots"] == SLOTS and triton["dlm_kv_capacity_positions"] % SLOTS == 0
    # prefix caching is on by default (config.pbtxt): its capacity in the router's blocks
    assert triton["dlm_prefix_cache_capacity_positions"] == triton["dlm_kv_capacity_positions"]
    assert samples[CACHE_BLOCK_SIZE] == CACHE_BLOCK_TOKENS and types[CACHE_NUM_BLOCKS] == "gauge"
    assert samples[CACHE_NUM_BLOCKS] == triton["dlm_kv_capacity_positions"] // CACHE_BLOCK_TOKENS


@pytest.mark.slow
def test_the_gauges_mean_what_they_say_past_the_slots(replica):
    """2 slots, 4 long requests through the gateway: 2 run and 2 wait; the KV usage rises while the same 2 run."""
    server, gateway = replica
    capacity = server.metrics()["dlm_kv_capacity_positions"]
    prompt_tokens = len(TextCodec(REPOSITORY / "dlm" / "1" / "tokenizer").encode(PROMPT))
    results: list[Any] = []

    def complete() -> None:
        body = {"model": "dlm", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "mode": "ar",
                "ignore_eos": True}
        try:
            results.append(httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=300).json())
        except Exception as error:  # noqa: BLE001 - reported below
            results.append(error)

    threads = [threading.Thread(target=complete) for _ in range(2 * SLOTS)]
    for thread in threads:
        thread.start()
    seen: list[tuple[float, float, float]] = []  # (waiting, running, usage) per scrape
    while any(t.is_alive() for t in threads):
        samples, _ = scrape(gateway.url)
        seen.append((samples[WAITING], samples[RUNNING], samples[KV_USAGE]))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert all(isinstance(r, dict) and r["usage"]["completion_tokens"] == TOKENS for r in results), results

    # past the slots: requests wait while every slot runs one. A request is counted waiting from its arrival to
    # its admission at the scheduler's next turn, so a scrape may catch one waiting beside a free slot: as the
    # requests arrive, or as the first two end and the next two are admitted. Those moments are brief; the wait is
    # not.
    full = [s for s in seen if s[0] > 0]
    assert full, seen[:20]
    assert max(s[0] for s in seen) == SLOTS and max(s[1] for s in seen) == SLOTS  # never more running than slots
    admitting = [s for s in full if s[1] < SLOTS]
    assert len(admitting) <= max(2, len(full) // 10), (admitting, len(full))
    # while the first two run (2 waiting), the usage is what they hold: their prompts and what they have written,
    # and it rises as they decode (from their first pass on: a scrape between their admission and the end of that
    # pass finds nothing written yet)
    first = [s[2] for s in seen if s[0] == SLOTS and s[1] == SLOTS and s[2] > 0]
    assert len(first) >= 5, seen[:20]
    assert first == sorted(first) and first[-1] > first[0], first
    held = [usage * capacity for usage in first]
    # the first scrape may find the second prompt still being prefilled, in chunks: one prompt at least is written;
    # by the last, both prompts and some of their answers
    assert prompt_tokens <= held[0] and SLOTS * prompt_tokens < held[-1], (held, capacity, prompt_tokens)
    assert held[-1] <= SLOTS * (prompt_tokens + TOKENS + 1), (held, capacity)
    assert max(s[2] for s in seen) <= 1
    # and all three back to 0 once the requests are done
    deadline = time.monotonic() + 10
    while True:
        samples, _ = scrape(gateway.url)
        if (samples[WAITING], samples[RUNNING], samples[KV_USAGE]) == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (samples[WAITING], samples[RUNNING], samples[KV_USAGE]) == (0, 0, 0), samples
    print(f"gauges: {len(seen)} scrapes, max waiting {max(s[0] for s in seen):.0f}, running {SLOTS} of {SLOTS} "
          f"while waiting, KV usage {first[0]:.4f} -> {first[-1]:.4f} of {capacity:.0f} positions, back to 0")


# --- the router's configuration against what the replica exports ---------------------------------------------------
# the router's own parse of a metric specification (llm-d-router v0.10, pkg/epp/framework/plugins/datalayer/extractor/
# metrics/spec.go: metricSpecRE, then Prometheus' legacy metric-name rule)
METRIC_SPEC = re.compile(r"^\s*(\S+?)\s*(?:\{([^}]*)\})?\s*$")
LEGACY_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
ENGINE_LABEL = "llm-d.ai/engine-type"
# what each spec field of an engineConfig is read as (the router's CoreMetricsExtractor), and our gauge for it
SPEC_FIELDS = {"queuedRequestsSpec": WAITING, "runningRequestsSpec": RUNNING, "kvUsageSpec": KV_USAGE,
               "cacheBlockSizeSpec": CACHE_BLOCK_SIZE, "cacheNumBlocksSpec": CACHE_NUM_BLOCKS}


def rendered_chart(*args: str) -> list[dict]:
    helm = subprocess.run([str(ROOT / "scripts" / "helm.sh"), "--path"], capture_output=True, text=True,
                          timeout=600)
    assert helm.returncode == 0, helm.stderr
    done = subprocess.run([helm.stdout.strip().splitlines()[-1], "template", "rel", str(ROOT / "deploy" / "helm" / "dlm"),
                           "--namespace", "serving", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def router_engine(docs: list[dict]) -> tuple[dict, dict, str]:
    """The EndpointPickerConfig the chart's router loads, its core-metrics-extractor parameters, and the engine type
    the pool's pods carry."""
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    (router,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-router")]
    (epp,) = router["spec"]["template"]["spec"]["containers"]
    (config_file,) = [a.split("=", 1)[1] for a in epp["args"] if a.startswith("--config-file=")]
    mounts = {m["name"]: m["mountPath"] for m in epp["volumeMounts"]}
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    (volume,) = [name for name, path in mounts.items() if config_file.startswith(path + "/")]
    configmap_name = volumes[volume]["configMap"]["name"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == configmap_name]
    config = yaml.safe_load(configmap["data"][config_file.rsplit("/", 1)[1]])
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    pods = [d for d in docs if d["kind"] == "Deployment"
            and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v
                    for k, v in pool["spec"]["selector"]["matchLabels"].items())]
    (triton,) = pods
    return config, extractor["parameters"], triton["spec"]["template"]["metadata"]["labels"][ENGINE_LABEL]


@pytest.mark.slow  # the module's tritonserver takes about 10 s to start
def test_the_router_configuration_names_the_gauges_the_replica_exports(replica):
    server, gateway = replica
    config, parameters, engine = router_engine(rendered_chart())
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    assert parameters.get("engineLabelKey", ENGINE_LABEL) == ENGINE_LABEL
    (mapping,) = [e for e in parameters["engineConfigs"] if e["name"] == engine]
    assert parameters["defaultEngine"] == engine  # an unlabelled pod of this pool reads the same names
    assert set(mapping) - {"name"} == set(SPEC_FIELDS)  # every name the router is told to read is checked
    samples, types = scrape(gateway.url)
    for field, gauge in SPEC_FIELDS.items():
        parsed = METRIC_SPEC.match(mapping[field])
        assert parsed and LEGACY_METRIC_NAME.match(parsed.group(1)) and not parsed.group(2), mapping[field]
        assert parsed.group(1) == gauge and types.get(gauge) == "gauge" and gauge in samples, (field, types)
    # the scorers that read these gauges are the ones the scheduling profile weighs
    referenced = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    assert referenced <= declared and {"queue-scorer", "kv-cache-utilization-scorer"} <= referenced
    # the router scrapes the pool's target port at the path its metrics data source names: the gateway's port
    (pool,) = [d for d in rendered_chart() if d["kind"] == "InferencePool"]
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics" and source["parameters"]["scheme"] == "http"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [9000]


@pytest.mark.slow  # the module's tritonserver takes about 10 s to start
def test_with_triton_gone_the_gauges_vanish_and_requests_get_503(replica):
    """Last in this module: it kills the module's server."""
    server, gateway = replica
    server.kill()
    samples, _ = scrape(gateway.url)
    assert samples["dlm_gateway_triton_metrics_up"] == 0
    assert not {WAITING, RUNNING, KV_USAGE} & set(samples)  # missing: the router sends this replica nothing
    health = httpx.get(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["triton_ready"] is False
    response = httpx.post(f"{gateway.url}/v1/completions", json={"model": "dlm", "prompt": "1+1=", "max_tokens": 4},
                          timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "server_error"
