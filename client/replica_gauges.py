"""The model-server protocol's gauges (Gateway API Inference Extension, proposal 003) on the gateway's `/metrics`:
what the llm-d router scrapes on each replica to pick one, read from the Triton process beside the gateway.

| gauge on the gateway's /metrics | read from Triton's metrics port | meaning |
| --- | --- | --- |
| `dlm:num_requests_waiting` | `dlm_queue_depth` | requests queued for a KV-cache slot |
| `dlm:num_requests_running` | `dlm_live_slots` | requests being decoded (slots in use) |
| `dlm:kv_cache_usage_perc` | `dlm_kv_cache_usage` | KV-cache positions held by live requests / (slots x context), 0 to 1 |

With prefix caching on, two more gauges tell the router's prefix-cache scorer how much prompt content a replica
keeps (it sizes its per-replica index by them):

| gauge | from | meaning |
| --- | --- | --- |
| `dlm:cache_block_size` | constant | 64 tokens: the granularity the router matches prefixes at (its minimum). The model reuses any shared prefix to the token; matching in 64-token blocks only under-counts that |
| `dlm:cache_num_blocks` | `dlm_prefix_cache_capacity_positions` / 64 | the resident content's capacity (slots x context) in such blocks |

The names follow vLLM's (`vllm:num_requests_waiting`, ...) with the model's own prefix; the chart's
`EndpointPickerConfig` maps them for the router (`engineConfigs`, engine type `dlm`, the pod label
`llm-d.ai/engine-type: dlm`). They come from the model's scheduler through Triton's custom metrics (model.py's
`Metrics`): Triton's own queue metrics stay near 0 for a decoupled model, which queues inside itself.

Each scrape reads Triton's metrics afresh. When Triton's metrics cannot be read (Triton down or hung), the three
gauges are left out and `dlm_gateway_triton_metrics_up` is 0: the router treats a replica whose gauges are missing
as saturated and sends it nothing, which is right for a replica that cannot answer.
"""

from __future__ import annotations

import httpx

# the router-facing name -> (Triton's metric, help text)
GAUGES: dict[str, tuple[str, str]] = {
    "dlm:num_requests_waiting": ("dlm_queue_depth", "Requests waiting for a KV-cache slot (the model's queue)"),
    "dlm:num_requests_running": ("dlm_live_slots", "Requests being decoded (KV-cache slots in use)"),
    "dlm:kv_cache_usage_perc": ("dlm_kv_cache_usage", "KV-cache utilisation, 0 to 1: positions held by live "
                                                      "requests / (slots x context)"),
}


# the prefix-cache gauges: the block the router hashes prompts in (its minimum, llm-d-router v0.10's
# minBlockSizeTokens), and Triton's metric of the positions prefix caching may keep
CACHE_BLOCK_TOKENS = 64
CACHE_BLOCK_SIZE, CACHE_NUM_BLOCKS = "dlm:cache_block_size", "dlm:cache_num_blocks"
RESIDENT_POSITIONS = "dlm_prefix_cache_capacity_positions"


def triton_metrics_url(triton: str) -> str:
    """Triton's metrics URL beside its gRPC address `host:port`: the same host, port 8002 (Triton's default)."""
    host = triton.split("://", 1)[-1].rsplit(":", 1)[0] or "localhost"
    return f"http://{host}:8002/metrics"


def read_samples(text: str) -> dict[str, float]:
    """{'name': value} of the unlabelled samples in Prometheus' text format (the model's gauges have no labels)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "{" not in name:
            try:
                samples[name.strip()] = float(value)
            except ValueError:
                continue
    return samples


def render(samples: dict[str, float] | None) -> str:
    """The protocol's gauges from Triton's samples, in Prometheus' text format, and whether Triton answered. A
    gauge Triton does not report (the model not loaded) is left out, as all are when `samples` is None."""
    lines = ["# HELP dlm_gateway_triton_metrics_up 1 when this scrape read Triton's metrics, else 0 (the "
             "gauges below are then absent)",
             "# TYPE dlm_gateway_triton_metrics_up gauge",
             f"dlm_gateway_triton_metrics_up {0 if samples is None else 1}"]
    for name, (source, help_text) in GAUGES.items():
        if samples is not None and source in samples:
            value = samples[source]
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f"{name} {int(value) if value.is_integer() else repr(value)}"]
    resident = (samples or {}).get(RESIDENT_POSITIONS, 0)
    if resident > 0:  # prefix caching is on
        lines += [f"# HELP {CACHE_BLOCK_SIZE} Tokens per block the router's prefix index should hash (the model "
                  "reuses prefixes to the token)", f"# TYPE {CACHE_BLOCK_SIZE} gauge",
                  f"{CACHE_BLOCK_SIZE} {CACHE_BLOCK_TOKENS}",
                  f"# HELP {CACHE_NUM_BLOCKS} Prompt content prefix caching may keep, in such blocks (slots x context "
                  "/ block size)", f"# TYPE {CACHE_NUM_BLOCKS} gauge",
                  f"{CACHE_NUM_BLOCKS} {int(resident) // CACHE_BLOCK_TOKENS}"]
    return "\n".join(lines) + "\n"


class ReplicaGauges:
    """Reads Triton's metrics for each scrape of the gateway's /metrics. Create it inside the serving event loop."""

    def __init__(self, url: str, timeout: float = 1.0):
        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout)

    async def read(self) -> dict[str, float] | None:
        try:
            response = await self._client.get(self.url)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return read_samples(response.text)

    async def text(self) -> str:
        return render(await self.read())

    async def close(self) -> None:
        await self._client.aclose()
