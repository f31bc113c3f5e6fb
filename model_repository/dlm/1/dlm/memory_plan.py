"""The memory plan of one model instance: what the weights, the engine's own working memory, the KV cache and every
staging buffer take, sized for what one planned pass can use, against the device's free memory.

The cache takes `slots × context` positions; the staging buffers are sized by the pass planner's limits, not by the
worst case of everything at once: the gathered past by the most rows one pass holds × the context, the new keys and
values and the inputs by the per-pass token budget (B × T ≤ `max_num_tokens`), the candidates by the budget × K. At
load, the plan is logged one line per part (GiB) and a deployment that cannot fit is refused with the numbers; with
`free_memory_fraction` (TensorRT-LLM's `kv_cache_free_gpu_mem_fraction` in spirit) the slots are reduced to what
fits. On the CPU the same plan covers host memory (`MemAvailable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, int]  # bytes by part, in the order they are logged
    available: int | None  # bytes the device has free for what is not resident yet (None: unknown)
    resident: frozenset[str] = frozenset()  # parts already in memory when `available` was read (loaded weights)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def to_allocate(self) -> int:
        return sum(size for name, size in self.parts.items() if name not in self.resident)

    @property
    def fits(self) -> bool:
        return self.available is None or self.to_allocate <= self.available

    def lines(self) -> list[str]:
        out = [f"{name:28s} {size / GIB:9.3f} GiB" + ("  (loaded)" if name in self.resident else "")
               for name, size in self.parts.items()]
        out.append(f"{'total':28s} {self.total / GIB:9.3f} GiB")
        if self.available is not None:
            out.append(f"{'free for the rest':28s} {self.available / GIB:9.3f} GiB")
        return out


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of the family's layout (DESIGN §2) from a config.json: embeddings, untied head, layers, norm."""
    h, v, i = int(config["hidden_size"]), int(config["vocab_size"]), int(config["intermediate_size"])
    heads, kv, d = int(config["num_attention_heads"]), int(config["num_key_value_heads"]), int(config["head_dim"])
    layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h
    return 2 * v * h + int(config["num_hidden_layers"]) * layer + h


def per_position_bytes(contract: Any) -> int:
    """Cache bytes of one position of one sequence."""
    return contract.num_layers * 2 * contract.num_kv_heads * contract.head_dim * ITEMSIZE[contract.cache_dtype]


def plan_memory(contract: Any, slots: int, context: int, token_budget: int, weight_bytes: int,
                activation_bytes: int | None = None, available: int | None = None,
                config: dict[str, Any] | None = None, weights_loaded: bool = False) -> MemoryPlan:
    """The plan for `slots` sequences of `context` positions under a per-pass `token_budget`. `activation_bytes`:
    the engine's own working memory (TensorRT's `device_memory_size_v2`); without it, an estimate from `config`
    (hidden states and MLP activations of a full pass in float32, the [rows, N, V] logits at the predicted
    positions, which never leave the graph, and attention scores materialised for the widest pass: an upper bound,
    which fused attention does not reach)."""
    profile = contract.profile
    rows = profile.batch[2]
    position = per_position_bytes(contract)
    candidates = token_budget * contract.top_k * (8 + 4) + token_budget * 4
    if activation_bytes is None:
        if config is None:
            raise ValueError("an activation estimate needs the model's config.json")
        hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
        activation_bytes = token_budget * (6 * hidden + 3 * intermediate) * 4
        activation_bytes += rows * profile.max_block * contract.vocab_size * 4
        activation_bytes += token_budget * int(config["num_attention_heads"]) * context * 4
    parts = {
        "weights": weight_bytes,
        "engine working memory": activation_bytes,
        "KV cache": slots * context * position,
        "gathered past (staging)": rows * context * position,
        "new keys and values": token_budget * position,
        "candidates out": candidates,
        "inputs": token_budget * 8 * 3 + rows * (context + token_budget) * 8,
    }
    return MemoryPlan(parts, available, frozenset({"weights"} if weights_loaded else ()))


def fit_slots(contract: Any, wanted_slots: int, context: int, token_budget: int, weight_bytes: int,
              available: int, fraction: float, activation_bytes: int | None = None,
              config: dict[str, Any] | None = None, weights_loaded: bool = False) -> tuple[int, MemoryPlan]:
    """The most slots (at most `wanted_slots`) whose plan fits in `fraction` of `available`, and that plan
    (`weights_loaded`: `available` was read with the weights in memory already). Raises MemoryError with the
    plan's numbers when not even one slot fits."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"free_memory_fraction must be in (0, 1], got {fraction}")
    budget = int(available * fraction)

    def plan(slots: int) -> MemoryPlan:
        return plan_memory(contract, slots, context, token_budget, weight_bytes, activation_bytes, budget, config,
                           weights_loaded)

    per_slot = context * per_position_bytes(contract)
    slots = min(wanted_slots, max(0, (budget - plan(0).to_allocate) // per_slot))
    chosen = plan(max(slots, 1))
    if slots < 1:
        raise MemoryError(
            f"this deployment does not fit: one slot of {context} positions needs {chosen.to_allocate / GIB:.2f} GiB "
            f"more, {fraction:.0%} of the {available / GIB:.2f} GiB free is {budget / GIB:.2f} GiB ("
            + "; ".join(f"{name} {size / GIB:.2f}" for name, size in chosen.parts.items())
            + " GiB); lower context or max_num_tokens, or use a larger device"
        )
    return slots, chosen


def host_available_bytes() -> int | None:
    """`MemAvailable` of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_for_runtime(runtime: Any, config: dict[str, Any], wanted_slots: int, context: int, token_budget: int,
                     fraction: float) -> tuple[int, MemoryPlan]:
    """`fit_slots` for a loaded runtime (its weights are in memory already, its engine may report its working
    memory); without a reading of free memory, the plan for `wanted_slots` unchecked."""
    weights, activation = runtime.weight_bytes(), runtime.activation_bytes
    available = runtime.free_memory()
    if available is None:
        return wanted_slots, plan_memory(runtime.contract, wanted_slots, context, token_budget, weights, activation,
                                         None, config, weights_loaded=True)
    return fit_slots(runtime.contract, wanted_slots, context, token_budget, weights, available, fraction,
                     activation, config, weights_loaded=True)
