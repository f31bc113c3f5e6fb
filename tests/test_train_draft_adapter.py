"""The draft adapter's trainer: its rows are the drafting pass's and the look-ahead row's exact inputs."""

from __future__ import annotations

import random

import torch

from conftest import TINY_CONFIG, load_script
from export.config import ModelConfig

MASK = 4


def config() -> ModelConfig:
    return ModelConfig.from_dict(dict(TINY_CONFIG, vocab_size=128, mask_token_id=MASK, pad_token_id=3))


def pairs() -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation ending in the end token 2): one short answer, one longer than a block of 8."""
    return [([1, 10, 11, 12], [20, 21, 2]), ([1, 13, 14], [30 + i for i in range(12)] + [2])]


def test_drafting_rows_are_a_seed_then_masks_with_the_continuation_as_targets():
    adapter = load_script("train_draft_adapter")
    batch = adapter.make_batch(pairs(), config(), 16, 8, random.Random(0), look_ahead=False)
    for r in range(16):
        block = batch["draft"][r].nonzero().flatten()
        assert len(block) == 8
        ids, target = batch["ids"][r, block], batch["target"][r, block]
        assert ids[0] != MASK and (ids[1:] == MASK).all()
        assert target[0] == -100  # the seed is given, never predicted
        prompt, answer = next((p, a) for p, a in pairs() if p[1] == batch["ids"][r, 1])
        j = int(batch["pos"][r, block[0]]) - len(prompt)  # the seed is answer[j]
        assert ids[0] == answer[j]
        assert [t for t in target[1:].tolist() if t != -100] == answer[j + 1 : j + 8]
        # the block's positions continue its clean context (prompt + the continuation so far), which it all sees
        context = int(batch["allowed"][r, block[0], : block[0]].sum())
        assert context >= 3 and batch["pos"][r, block[0]] == context
        assert batch["allowed"][r, block][:, block].all()

def test_look_ahead_rows_hold_a_whole_clean_block_then_masks_that_predict_the_next():
    adapter = load_script("train_draft_adapter")
    prompt, answer = pairs()[1]
    batch = adapter.make_batch(pairs(), config(), 16, 8, random.Random(1), look_ahead=True)
    for r in range(16):
        block = batch["draft"][r].nonzero().flatten()
        assert len(block) == 16
        ids, target = batch["ids"][r, block].tolist(), batch["target"][r, block].tolist()
        j = int(batch["pos"][r, block[0]]) - len(prompt)  # the verified block starts at answer[j]
        assert ids[:8] == answer[j : j + 8] and ids[8:] == [MASK] * 8  # only the long answer has room
        assert target[:8] == [-100] * 8
        assert [t for t in target[8:] if t != -100] == answer[j + 8 : j + 16]


def test_a_few_steps_move_only_the_adapter():
    adapter = load_script("train_draft_adapter")
    from export.model import DiffusionLM

    torch.manual_seed(0)
    model = DiffusionLM(config()).float()
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.attach_draft_adapter(adapter.fresh_adapter(model, 4, 8.0, None))
    lora = [p for n, p in model.named_parameters() if ".draft_lora." in n]
    for p in lora:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    rng = random.Random(0)
    for _ in range(3):
        batch = adapter.make_batch(pairs(), model.config, 8, 8, rng, look_ahead=rng.random() < 0.5)
        logits, _ = model.forward_with_mask(batch["ids"], batch["pos"], batch["allowed"], draft=batch["draft"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1),
                                                 ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(base[k], v) for k, v in model.base_state_dict().items())
    assert any(lo.lora_B.weight.abs().sum() > 0 for lo in model.draft_loras())
