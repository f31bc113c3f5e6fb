"""The denoiser against transformers' Ministral3 (causal mode) and its KV-cache path against full forwards."""

from __future__ import annotations

import copy

import pytest
import torch


def ones(b, n):
    return torch.ones(b, n, dtype=torch.long)


def test_causal_logits_match_transformers_ministral3(tiny_model, tiny_config_dict):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    d = copy.deepcopy(tiny_config_dict)
    for key in ("architectures", "model_type", "mask_token_id", "block_size"):
        d.pop(key)
    ref_config = transformers.Ministral3Config(**d)
    ref_config._attn_implementation = "eager"
    reference = transformers.Ministral3ForCausalLM(ref_config).float().eval()
    renamed = {
        k.replace("encoder.", "model.").replace("diffusion_head", "lm_head"): v for k, v in tiny_model.state_dict().items()
    }
    reference.load_state_dict(renamed, strict=True)
    ids = torch.randint(0, 128, (2, 70))  # crosses several YaRN query-scaling steps (original context 16)
    pos = torch.arange(70).expand(2, 70)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        logits, present = tiny_model.full_logits(ids, pos, ones(2, 70), tiny_model.empty_cache(2), torch.tensor(True))
    assert (logits - expected).abs().max() < 1e-4
    c = tiny_config_dict
    assert present.shape == (2, c["num_hidden_layers"], 2, c["num_key_value_heads"], 70, c["head_dim"])


def test_kv_cache_path_equals_full_forward_under_block_causal_mask(tiny_model):
    """Prefix written causally into the cache, then a block run bidirectionally against it, equals one forward
    over prefix + block with the block-causal mask (prefix causal, block bidirectional)."""
    b, n, t = 2, 11, 8
    ids = torch.randint(0, 128, (b, n + t))
    pos = torch.arange(n + t).expand(b, -1)
    idx = torch.arange(n + t)
    allowed = (idx[None, :] <= idx[:, None]) | ((idx[:, None] >= n) & (idx[None, :] >= n))
    with torch.no_grad():
        full, _ = tiny_model.forward_with_mask(ids, pos, allowed.expand(b, -1, -1))
        prefix_logits, cache = tiny_model.full_logits(ids[:, :n], pos[:, :n], ones(b, n), tiny_model.empty_cache(b), torch.tensor(True))
        block_logits, block_kv = tiny_model.full_logits(ids[:, n:], pos[:, n:], ones(b, n + t), cache, torch.tensor(False))
    assert torch.allclose(prefix_logits, full[:, :n], atol=1e-5)
    assert torch.allclose(block_logits, full[:, n:], atol=1e-5)
    assert block_kv.shape[4] == t  # present holds the new tokens only


def test_incremental_causal_decoding_equals_full_causal_forward(tiny_model):
    ids = torch.randint(0, 128, (1, 12))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        full, _ = tiny_model.full_logits(ids, pos, ones(1, 12), tiny_model.empty_cache(1), torch.tensor(True))
        cache = tiny_model.empty_cache(1)
        for i in range(12):
            step, kv = tiny_model.full_logits(ids[:, i : i + 1], pos[:, i : i + 1], ones(1, i + 1), cache, torch.tensor(True))
            cache = torch.cat((cache, kv), dim=4)
            assert torch.allclose(step[:, 0], full[:, i], atol=1e-5)


def test_padding_mask_and_per_row_causal_flag(tiny_model):
    """A left-padded row with shifted positions equals the same row alone; causal is chosen per row."""
    short = torch.randint(5, 128, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1)
    other = torch.randint(5, 128, (1, 9))
    ids = torch.cat((padded, other))
    pos = torch.stack((torch.cat((torch.zeros(3, dtype=torch.long), torch.arange(6))), torch.arange(9)))
    mask = torch.stack((torch.tensor([0, 0, 0] + [1] * 6), torch.ones(9, dtype=torch.long)))
    with torch.no_grad():
        batch, _ = tiny_model.full_logits(ids, pos, mask, tiny_model.empty_cache(2), torch.tensor([True, False]))
        alone, _ = tiny_model.full_logits(short, torch.arange(6)[None], ones(1, 6), tiny_model.empty_cache(1), torch.tensor(True))
        bidir, _ = tiny_model.full_logits(other, torch.arange(9)[None], ones(1, 9), tiny_model.empty_cache(1), torch.tensor(False))
    assert torch.allclose(batch[0, 3:], alone[0], atol=1e-5)
    assert torch.allclose(batch[1], bidir[0], atol=1e-5)


def test_rope_frequencies_stay_float32_when_the_model_is_cast(tiny_model):
    reference = tiny_model.inv_freq.clone()
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    assert torch.equal(half.inv_freq, reference)


def test_contract_forward_selects_candidates_at_the_requested_positions(tiny_model):
    """`forward` (engine contract v2) returns, at each requested position, the K best ids of the full logits with
    the mask id excluded, their logits, and the log-sum-exp over the rest of the vocabulary."""
    from export.model import DiffusionLM

    assert isinstance(tiny_model, DiffusionLM)
    mask_id = tiny_model.config.mask_token_id
    ids = torch.randint(0, 128, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    cache, causal = tiny_model.empty_cache(2), torch.tensor([True, False])
    positions = torch.tensor([[8, 0, 3], [2, 2, 5]])
    with torch.no_grad():
        full, _ = tiny_model.full_logits(ids, pos, ones(2, 9), cache, causal)
        tokens, logits, lse, present = tiny_model(ids, pos, ones(2, 9), cache, causal, positions)
    assert tokens.shape == logits.shape == (2, 3, tiny_model.top_k) and lse.shape == (2, 3)
    assert tokens.dtype == torch.int64 and logits.dtype == lse.dtype == torch.float32
    assert present.shape[4] == 9
    picked = torch.gather(full, 1, positions[:, :, None].expand(-1, -1, full.shape[-1]))
    picked[..., mask_id] = float("-inf")
    want_logits, want_tokens = torch.topk(picked, tiny_model.top_k, dim=-1)
    assert not (tokens == mask_id).any()
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(picked, dim=-1), atol=1e-5)
