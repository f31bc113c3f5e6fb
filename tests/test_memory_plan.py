"""The memory plan (`dlm.memory_plan`): every part accounted, sized by what one planned pass can use, against the
device's free memory; the real 8B shape at 16 slots × 4096 positions fits an 80 GB GPU with bf16 weights."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dlm.contract import EngineContract, Profile
from dlm.memory_plan import GIB, MemoryPlan, fit_slots, host_available_bytes, parameter_count, plan_memory
from test_faults import model_state, outcome
from triton_server import (ENDLESS_PROMPT, REPOSITORY, grpc_generate, http_post, prepare_repository,
                           repository_with, start_server)

CONFIG_8B = {"hidden_size": 4096, "num_hidden_layers": 34, "intermediate_size": 14336, "vocab_size": 131072,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}


def contract_8b(cache_dtype: str = "bfloat16") -> EngineContract:
    profile = Profile.from_limits(block_size=32, max_batch=16, max_context=4096, max_tokens=4096, max_block=64)
    return EngineContract(34, 8, 128, 131072, cache_dtype, profile, 64)


def test_the_8b_plan_fits_an_80_gb_gpu_at_16_slots_of_4096():
    weights = parameter_count(CONFIG_8B) * 2  # bf16
    plan = plan_memory(contract_8b(), 16, 4096, 8192, weights, None, 80 * 10**9, CONFIG_8B)
    print("\n".join(plan.lines()))
    assert 8.4e9 < parameter_count(CONFIG_8B) < 8.6e9  # 8B plus the untied 0.5B head
    assert plan.parts["KV cache"] == 16 * 4096 * 34 * 2 * 8 * 128 * 2 == 8.5 * GIB
    assert plan.parts["gathered past (staging)"] == plan.parts["KV cache"]  # 16 rows of 4096, one pass's most
    assert plan.parts["new keys and values"] == 8192 * 34 * 2 * 8 * 128 * 2  # the budget, not 16 × 4096
    assert plan.parts["candidates out"] < 0.01 * GIB  # never the vocabulary
    assert plan.fits and plan.total < 45 * GIB


def test_slots_are_lowered_to_what_fits_and_a_deployment_that_cannot_fit_is_refused():
    weights = parameter_count(CONFIG_8B) * 2
    base = plan_memory(contract_8b(), 0, 4096, 8192, weights, None, None, CONFIG_8B, weights_loaded=True)
    per_slot = 4096 * 34 * 2 * 8 * 128 * 2
    available = base.to_allocate + 5 * per_slot + per_slot // 2  # room for five slots and a half
    slots, plan = fit_slots(contract_8b(), 16, 4096, 8192, weights, available, 1.0, None, CONFIG_8B,
                            weights_loaded=True)
    assert slots == 5 and plan.fits and "weights" in plan.resident
    with pytest.raises(MemoryError, match=r"does not fit: one slot of 4096 positions needs .* GiB more.*KV cache"):
        fit_slots(contract_8b(), 16, 4096, 8192, weights, base.to_allocate, 1.0, None, CONFIG_8B,
                  weights_loaded=True)
    with pytest.raises(ValueError, match=r"free_memory_fraction must be in \(0, 1\]"):
        fit_slots(contract_8b(), 16, 4096, 8192, weights, available, 1.5, None, CONFIG_8B)


def test_an_fp32_cache_doubles_the_cache_parts():
    weights = parameter_count(CONFIG_8B) * 2
    bf16 = plan_memory(contract_8b(), 16, 4096, 8192, weights, None, None, CONFIG_8B)
    fp32 = plan_memory(contract_8b("float32"), 16, 4096, 8192, weights, None, None, CONFIG_8B)
    assert fp32.parts["KV cache"] == 2 * bf16.parts["KV cache"]


def test_the_server_logs_its_plan(triton):
    log = triton.log_path.read_text(errors="replace")
    for part in ("weights", "KV cache", "gathered past (staging)", "new keys and values", "free for the rest"):
        assert f"dlm memory plan: {part}" in log


# --- the plan applied by a real tritonserver ------------------------------------------------------------------------
LONG = 300  # tokens of ENDLESS_PROMPT in ar: 300 passes, seconds of work that no request ends early


def repository_parameters() -> dict[str, str]:
    """config.pbtxt's parameters, as Triton hands them to the model."""
    config = (REPOSITORY / "dlm" / "config.pbtxt").read_text()
    return dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]*)" \}', config))


@pytest.fixture(scope="module")
def deployment():
    """The repository's deployment loaded here as model.py loads it (its runtime, limits and plan)."""
    from dlm.deployment import load_deployment

    prepare_repository()
    return load_deployment(REPOSITORY / "dlm" / "1", repository_parameters(), log=lambda line: None)


def one_slot_plan(deployment) -> MemoryPlan:
    """The server's plan for one slot (its weights loaded): what it allocates besides the cache, and one slot's."""
    return plan_memory(deployment.runtime.contract, 1, deployment.context, deployment.pass_limits.token_budget,
                       deployment.runtime.weight_bytes(), deployment.runtime.activation_bytes, None,
                       deployment.model_config, weights_loaded=True)


def test_a_small_free_memory_fraction_lowers_the_servers_slots(deployment, tmp_path):
    """free_memory_fraction sized for about six and a half slots of the host's free memory now: the server logs the
    lowered max_live and runs exactly that many requests at once (one more waits in a queue of one, the next is
    refused naming the running count). The fraction is read against MemAvailable at load, which other work moves: any
    count from 1 to 15 is accepted, and the behaviour must match the count the server logged."""
    plan = one_slot_plan(deployment)
    slot, rest = plan.parts["KV cache"], plan.to_allocate - plan.parts["KV cache"]
    available = host_available_bytes()
    assert available is not None and 16 * slot > 0
    fraction = (rest + 6.5 * slot) / available
    repository = repository_with(tmp_path / "repository", free_memory_fraction=f"{fraction:.8g}", max_queue="1")
    server = start_server(tmp_path / "server.log", repository)
    try:
        log = server.log_tail(10_000)
        lowered = re.search(r"max_live lowered from 16 to (\d+) slots, what free_memory_fraction ", log)
        assert lowered, server.log_tail(60)
        slots = int(lowered.group(1))
        assert 1 <= slots < 16 and re.search(rf"\b{slots} slots of {deployment.context} positions", log)
        # slots + 1 long requests: `slots` run and one waits (the gauges say so, and never more running), then
        # one more is refused naming the running count; the long ones all finish
        with ThreadPoolExecutor(slots + 1) as pool:
            running = [pool.submit(outcome, grpc_generate, server.grpc_url, ENDLESS_PROMPT, mode="ar",
                                   max_tokens=LONG, timeout=300) for _ in range(slots + 1)]
            deadline, most = time.monotonic() + 60, 0.0
            while time.monotonic() < deadline:
                metrics = server.metrics()
                live, waiting = metrics.get("dlm_live_slots", 0.0), metrics.get("dlm_queue_depth", 0.0)
                most = max(most, live)
                if (live, waiting) == (slots, 1):
                    break
                time.sleep(0.05)
            assert (live, waiting, most) == (slots, 1, slots), (live, waiting, most)
            refused = outcome(grpc_generate, server.grpc_url, ENDLESS_PROMPT, mode="ar", max_tokens=4)
            assert f"the queue is full (1 requests waiting, {slots} running)" in refused, refused
            assert [f.result() for f in running] == ["ok"] * (slots + 1)
    finally:
        server.stop()


def test_a_deployment_that_cannot_fit_one_slot_is_unready_with_the_plans_numbers(deployment, tmp_path):
    """free_memory_fraction that leaves half of what one slot needs: the model stays unready, and the reason Triton
    gives (and logs) is the plan's refusal with its numbers, part by part."""
    plan = one_slot_plan(deployment)
    available = host_available_bytes()
    assert available is not None
    fraction = 0.5 * plan.to_allocate / available  # half of what one slot needs
    repository = repository_with(tmp_path / "repository", free_memory_fraction=f"{fraction:.8g}")
    server = start_server(tmp_path / "server.log", repository, ready_path="/v2/health/live")
    try:
        deadline = time.monotonic() + 60
        ready, reason = model_state(server)
        while not reason and time.monotonic() < deadline:  # loading may still be under way
            time.sleep(0.3)
            ready, reason = model_state(server)
        assert not ready
        expected = (rf"this deployment does not fit: one slot of {deployment.context} positions needs "
                    rf"{plan.to_allocate / GIB:.2f} GiB more, {fraction:.0%} of the \d+\.\d\d GiB free is "
                    rf"\d+\.\d\d GiB \(" + re.escape("; ".join(f"{name} {size / GIB:.2f}"
                                                               for name, size in plan.parts.items())))
        assert re.search(expected, reason), (expected, reason)
        assert re.search(expected, server.log_tail(200))
        # and nothing is served
        status, _ = http_post(server.http_url, "generate", {"text_input": "57+8=", "max_tokens": 4})
        assert status >= 400
    finally:
        server.stop()
