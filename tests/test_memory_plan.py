"""The memory plan (`dlm.memory_plan`): every part accounted, sized by what one planned pass can use, against the
device's free memory; the real 8B shape at 16 slots × 4096 positions fits an 80 GB GPU with bf16 weights."""

from __future__ import annotations

import pytest

from dlm.contract import EngineContract, Profile
from dlm.memory_plan import GIB, fit_slots, parameter_count, plan_memory

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
