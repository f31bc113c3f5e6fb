"""A reference decoder, test-only, written from DESIGN §2a's description of NVIDIA's reference code (`ar_generate`,
`generate` with `causal_context=True`, `linear_spec_generate`), not from `dlm.refine`.

The model is transformers' own `Ministral3ForCausalLM` with the checkpoint's weights (`encoder.` renamed `model.`,
`diffusion_head` as `lm_head`), decoding in float32 and greedily (temperature 0):

- a causal pass is the model's ordinary forward over a `DynamicCache`, which it extends;
- a bidirectional pass feeds only the block, with a 4-D all-True mask [B, 1, T, P+T] over cache + block and every
  layer's `self_attn.is_causal` off; the cache is cropped back to P afterwards, so the pass writes nothing;
- the draft-only LoRA (`linear_spec_lora/`) is `W_o + (alpha / r) · B @ A` on every layer's o_proj, swapped in for
  drafting passes only.

Tokens are chosen over the full vocabulary, the mask id included, and confidences are the softmax over the full
vocabulary (the mask id in the denominator) in the logits' dtype, as the reference does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file
from transformers import DynamicCache, Ministral3Config, Ministral3ForCausalLM
from transformers.models.ministral3.modeling_ministral3 import Ministral3Attention

# config.json keys of the diffusion checkpoint that Ministral3Config does not know
DIFFUSION_ONLY_KEYS = ("architectures", "model_type", "mask_token_id", "block_size", "auto_map")
LORA_PREFIX = "base_model.model.encoder.layers."


@dataclass
class Reference:
    """The causal model and, per layer, its o_proj weight without and with the draft LoRA merged in."""

    model: Ministral3ForCausalLM
    base_o_proj: list[torch.Tensor]
    draft_o_proj: list[torch.Tensor] | None  # None: the checkpoint has no draft adapter

    @property
    def attentions(self) -> list[Ministral3Attention]:
        return [cast(Ministral3Attention, layer.self_attn) for layer in self.model.model.layers]


@dataclass
class Output:
    tokens: list[list[int]]  # per row, the generated tokens (cut as the reference cuts them)
    nfe: int  # forward passes, counted as the reference counts them
    cycles: int = 0  # linear_spec_generate: draft-and-verify cycles


def load_reference(checkpoint: str | Path, adapter: str | Path | None = None) -> Reference:
    """`Ministral3ForCausalLM` in float32 with the checkpoint's weights (single file or shards), and the draft LoRA
    of `adapter` (a PEFT folder: `adapter_config.json`, `adapter_model.safetensors`) when one is given."""
    checkpoint = Path(checkpoint)
    settings = json.loads((checkpoint / "config.json").read_text())
    for key in DIFFUSION_ONLY_KEYS:
        settings.pop(key, None)
    config = Ministral3Config(**settings)
    config._attn_implementation = "sdpa"
    model = Ministral3ForCausalLM(config).float().eval()
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    renamed = {k.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): v.float()
               for k, v in weights.items()}
    model.load_state_dict(renamed, strict=True)
    base = [cast(Ministral3Attention, layer.self_attn).o_proj.weight.data for layer in model.model.layers]
    draft = None
    if adapter is not None:
        adapter = Path(adapter)
        lora = json.loads((adapter / "adapter_config.json").read_text())
        scale = float(lora["lora_alpha"]) / int(lora["r"])
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        draft = []
        for i, w in enumerate(base):
            a = tensors[f"{LORA_PREFIX}{i}.self_attn.o_proj.lora_A.weight"].float()
            b = tensors[f"{LORA_PREFIX}{i}.self_attn.o_proj.lora_B.weight"].float()
            draft.append(w + scale * b @ a)
    return Reference(model, base, draft)


# --- passes -------------------------------------------------------------------------------------------------------

def new_cache(ref: Reference) -> DynamicCache:
    return DynamicCache(config=ref.model.config)


def crop_to(cache: DynamicCache, length: int) -> None:
    """Drop the cache's positions from `length` on."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def positions(cache: DynamicCache, batch: int, length: int) -> torch.Tensor:
    start = cache.get_seq_length()
    return torch.arange(start, start + length).expand(batch, length)


@torch.no_grad()
def causal_pass(ref: Reference, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits [B, T, V] of a causal pass (logit i predicts position i + 1); the cache keeps the T new positions."""
    b, t = tokens.shape
    return ref.model(input_ids=tokens, position_ids=positions(cache, b, t), past_key_values=cache,
                     use_cache=True).logits


@contextmanager
def bidirectional(ref: Reference, draft: bool) -> Iterator[None]:
    """Every layer non-causal, and the draft LoRA merged into o_proj when `draft`, for the duration."""
    if draft:
        assert ref.draft_o_proj is not None, "the checkpoint has no draft adapter"
    for i, attention in enumerate(ref.attentions):
        attention.is_causal = False
        if draft and ref.draft_o_proj is not None:
            attention.o_proj.weight.data = ref.draft_o_proj[i]
    try:
        yield
    finally:
        for i, attention in enumerate(ref.attentions):
            attention.is_causal = True
            attention.o_proj.weight.data = ref.base_o_proj[i]


@torch.no_grad()
def bidirectional_pass(ref: Reference, block: torch.Tensor, cache: DynamicCache, draft: bool = False) -> torch.Tensor:
    """Logits [B, T, V] of a bidirectional pass over the block (logit i predicts position i), reading the whole
    cache and the whole block; the cache is left as it was."""
    b, t = block.shape
    past = cache.get_seq_length()
    mask = torch.ones(b, 1, t, past + t, dtype=torch.bool)
    with bidirectional(ref, draft):
        logits = ref.model(input_ids=block, attention_mask=mask, position_ids=positions(cache, b, t),
                           past_key_values=cache, use_cache=True).logits
    crop_to(cache, past)
    return logits


# --- helpers ------------------------------------------------------------------------------------------------------

def has_end(tokens: torch.Tensor, eos_ids: frozenset[int]) -> torch.Tensor:
    """[B] whether each row holds an end token."""
    return torch.isin(tokens, torch.tensor(sorted(eos_ids), dtype=torch.long)).any(dim=-1)


def cut_after_end(tokens: list[int], eos_ids: frozenset[int]) -> list[int]:
    """The tokens up to and including the first end token."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def cut_rows(generated: torch.Tensor, eos_ids: frozenset[int]) -> list[list[int]]:
    """Rows cut after their first end token only when every row has one (the reference's batch-wide cut)."""
    rows = generated.tolist()
    if len(eos_ids) and bool(has_end(generated, eos_ids).all()):
        return [cut_after_end(row, eos_ids) for row in rows]
    return rows


def end_settled(block: torch.Tensor, mask_id: int, eos_ids: frozenset[int]) -> torch.Tensor:
    """[B] whether the row's block holds an end token with no mask before it."""
    settled = []
    for row in block.tolist():
        first_mask = row.index(mask_id) if mask_id in row else len(row)
        settled.append(any(t in eos_ids for t in row[:first_mask]))
    return torch.tensor(settled, dtype=torch.bool)


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """Positions committed by each of `steps` passes: `masked // steps` each, the remainder one each in the first."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


# --- the three modes ----------------------------------------------------------------------------------------------

def ar_generate(ref: Reference, prompts: torch.Tensor, max_new_tokens: int, eos_ids: frozenset[int]) -> Output:
    """All layers causal: a causal prefill, then one causal pass per token, argmax; stops when every row has
    emitted an end token (which is part of the output). `nfe` counts every pass, the prefill included."""
    cache = new_cache(ref)
    token = causal_pass(ref, prompts, cache)[:, -1].argmax(-1)
    generated, nfe = token[:, None], 1
    while generated.shape[1] < max_new_tokens and not (len(eos_ids) and bool(has_end(generated, eos_ids).all())):
        token = causal_pass(ref, token[:, None], cache)[:, -1].argmax(-1)
        generated, nfe = torch.cat([generated, token[:, None]], dim=1), nfe + 1
    return Output(cut_rows(generated, eos_ids), nfe)


def generate(ref: Reference, prompts: torch.Tensor, max_new_tokens: int, block_length: int, mask_id: int,
             eos_ids: frozenset[int], threshold: float | None = None, steps: int | None = None) -> Output:
    """Block diffusion with a causal context. A causal prefill writes the cache and seeds the first block
    `[seed, mask × (L-1)]`; up to L (`steps` when given) bidirectional passes per block commit tokens, reading the
    cache without writing it; then one causal pass writes the whole block into the cache and seeds the next.

    Per pass: x0 = argmax of the logits over the full vocabulary, confidence = softmax(logits)[x0] at the masked
    positions. With `threshold`: the most confident masked position and every other masked one at or above the
    threshold. Without: `masked // L` positions per pass (the remainder one each in the first passes), the most
    confident. Denoising stops once every row has an end token with no mask before it (batch-wide), and the
    output is cut after the first end token only when every row has one. `nfe` counts the denoising passes and
    one causal pass per block, not the prefill."""
    batch = prompts.shape[0]
    assert max_new_tokens % block_length == 0, "max_new_tokens must be a multiple of block_length"
    passes = steps or block_length
    cache = new_cache(ref)
    seed = causal_pass(ref, prompts, cache)[:, -1].argmax(-1)
    generated, nfe = prompts.new_zeros((batch, 0)), 0
    for _ in range(max_new_tokens // block_length):
        block = torch.full((batch, block_length), mask_id, dtype=torch.long)
        block[:, 0] = seed
        schedule = [transfer_schedule(int(n), passes) for n in (block == mask_id).sum(dim=1)]
        for step in range(passes):
            masked = block == mask_id
            if not masked.any() or (len(eos_ids) and bool(end_settled(block, mask_id, eos_ids).all())):
                break
            logits = bidirectional_pass(ref, block, cache)
            nfe += 1
            x0 = logits.argmax(-1)
            confidence = torch.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
            confidence = torch.where(masked, confidence, -torch.inf)
            commit = torch.zeros_like(masked)
            for row in range(batch):
                if not masked[row].any():
                    continue
                if threshold is None:
                    commit[row, torch.topk(confidence[row], schedule[row][step]).indices] = True
                else:
                    commit[row] = confidence[row] >= threshold
                    commit[row, confidence[row].argmax()] = True
            block = torch.where(commit, x0, block)
        seed = causal_pass(ref, block, cache)[:, -1].argmax(-1)
        nfe += 1
        generated = torch.cat([generated, block], dim=1)
        if len(eos_ids) and bool(has_end(generated, eos_ids).all()):
            break
    return Output(cut_rows(generated, eos_ids), nfe)


def linear_spec_generate(ref: Reference, prompt: torch.Tensor, max_new_tokens: int, block_length: int, mask_id: int,
                         eos_ids: frozenset[int], draft_lora: bool = True) -> Output:
    """Linear self-speculation, batch 1. A causal prefill (LoRA off) gives the seed; each cycle drafts the block
    `[seed, mask × (L-1)]` in one bidirectional pass (LoRA on when `draft_lora`; every mask filled by its argmax),
    verifies it in one causal pass (LoRA off) that writes all L positions, accepts the longest prefix i in 0..L-2
    with verify[i] == block[i+1] plus one bonus token, emits verify[:accepted], crops the cache to the accepted
    positions and seeds the next cycle with the last emitted token. Stops once an end token is emitted or at least
    `max_new_tokens` are (it may overrun by up to L-1). `nfe` starts at 1 for the prefill."""
    assert prompt.shape[0] == 1, "linear_spec_generate decodes one row"
    cache = new_cache(ref)
    seed = int(causal_pass(ref, prompt, cache)[0, -1].argmax())
    out, nfe, cycles = [seed], 1, 0
    while len(out) < max_new_tokens and not any(t in eos_ids for t in out):
        block = torch.full((1, block_length), mask_id, dtype=torch.long)
        block[0, 0] = seed
        block[0, 1:] = bidirectional_pass(ref, block, cache, draft=draft_lora)[0, 1:].argmax(-1)
        past = cache.get_seq_length()
        verify = causal_pass(ref, block, cache)[0].argmax(-1)
        nfe, cycles = nfe + 2, cycles + 1
        agreeing = 0
        while agreeing < block_length - 1 and int(verify[agreeing]) == int(block[0, agreeing + 1]):
            agreeing += 1
        accepted = agreeing + 1
        crop_to(cache, past + accepted)
        out += verify[:accepted].tolist()
        seed = out[-1]
    return Output([cut_after_end(out, eos_ids)], nfe, cycles)
