"""The draft adapter's trainer: its rows are the drafting pass's and the look-ahead row's exact inputs."""

from __future__ import annotations

import math
import random

import pytest
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


def test_the_trainers_own_steps_move_only_the_adapter(tmp_path):
    """The script's freezing (`trainable_adapter`), optimizer and schedule (`make_optimizer`) and step
    (`train_step`), as `main` runs them: the base weights never change, the adapter does, the loss falls."""
    adapter = load_script("train_draft_adapter")
    from export.model import DiffusionLM

    torch.manual_seed(0)
    model = DiffusionLM(config()).float()
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    lora = adapter.trainable_adapter(model, 4, 8.0, tmp_path / "adapter")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".draft_lora." in n for n in trainable)  # every base weight frozen
    assert {id(p) for p in lora} == {id(p) for n, p in model.named_parameters() if ".draft_lora." in n}
    steps = 40  # a warm-up of 2 steps
    optimizer, schedule = adapter.make_optimizer(lora, 1e-2, steps)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in lora}  # the optimizer holds the adapter only
    rng = random.Random(0)
    batch = adapter.make_batch(pairs(), model.config, 8, 8, rng, look_ahead=False)
    losses, rates = [], []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        losses.append(adapter.train_step(model, batch, lora, optimizer, schedule))
    assert all(torch.equal(base[k], v) for k, v in model.base_state_dict().items())
    assert all(lo.lora_B.weight.abs().sum() > 0 for lo in model.draft_loras())  # B starts at zero: it moved
    assert losses[-1] < losses[0]  # the same batch, fitted
    cosine = [0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(10)]
    assert rates == pytest.approx([1e-2 * c * min(1.0, (s + 1) / 2) for s, c in enumerate(cosine)])  # warm-up, cosine
    assert schedule.lr_lambdas[0](steps) == pytest.approx(0.0, abs=1e-12)  # down to 0 at the last step
