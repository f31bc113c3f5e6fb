"""The training script: its joint objective learns, and its batches carry the block-causal mask."""

from __future__ import annotations

import random

import torch

from conftest import TINY_CONFIG, load_script
from export.config import ModelConfig


def test_a_few_steps_on_a_tiny_config_lower_the_loss():
    train = load_script("train_miniature")
    config = dict(TINY_CONFIG, vocab_size=train.VOCAB_SIZE, mask_token_id=4, pad_token_id=3)
    torch.set_num_threads(2)
    _, losses = train.train(config, steps=40, batch_size=16, lr=3e-3, seed=0, log_every=0)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


def test_batch_mask_is_block_causal():
    train = load_script("train_miniature")
    config = ModelConfig.from_dict(dict(TINY_CONFIG, vocab_size=train.VOCAB_SIZE, mask_token_id=4, pad_token_id=3))
    tokenizer = train.build_tokenizer()
    batch = train.make_batch(tokenizer, config, "upper", 2, 8, random.Random(0))
    allowed, ids, pos = batch["allowed"][0], batch["ids"][0], batch["pos"][0]
    prompt_len = int(batch["ar_target"][0].ne(-100).nonzero()[0]) + 1
    answer_len = int(batch["ar_target"][0].ne(-100).sum())
    clean = prompt_len + answer_len
    noisy_cols = torch.nonzero(batch["dlm_target"][0].ne(-100) | (ids == config.eos_token_id)).flatten()
    first_noisy = int(pos.eq(prompt_len).nonzero()[1])  # the second token at position prompt_len is the noised copy
    # clean tokens attend causally and never to the noised copy
    assert torch.equal(allowed[:clean, :clean], torch.tril(torch.ones(clean, clean, dtype=torch.bool)))
    assert not allowed[:clean, first_noisy:].any()
    # noised block 1 sees the prompt and the clean first block, and its own block bidirectionally, nothing else
    q = first_noisy + 8 + 3
    seen = allowed[q].nonzero().flatten().tolist()
    assert seen == list(range(prompt_len + 8)) + list(range(first_noisy + 8, first_noisy + 16))
    # a block's first token (the seed) is never masked
    assert ids[first_noisy] != config.mask_token_id and ids[first_noisy + 8] != config.mask_token_id
    assert noisy_cols.numel() > 0


def test_a_run_split_by_resume_gives_the_same_weights_as_an_unbroken_one(tmp_path):
    """The saved state (weights, optimizer, schedule, data stream, step) continues a run exactly."""
    train = load_script("train_miniature")
    config = dict(TINY_CONFIG, vocab_size=train.VOCAB_SIZE, mask_token_id=4, pad_token_id=3)
    torch.set_num_threads(2)
    recipe = train.Recipe(steps=6, batch_size=8, lr=3e-3, warmup=2, seed=0)
    unbroken = train.Trainer(config, recipe)
    for _ in range(6):
        unbroken.train_step()
    first = train.Trainer(config, recipe)
    for _ in range(3):
        first.train_step()
    torch.save(first.state(), tmp_path / "state.pt")
    resumed = train.Trainer(config, recipe)
    resumed.load_state(torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for (name, a), b in zip(unbroken.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.losses == unbroken.losses


def test_upper_casing_draws_every_length_and_additions_carry():
    from export.tasks import UPPER_LENGTHS, sample

    rng = random.Random(0)
    lengths = {len(sample("upper", rng, held_out=False, length=rng.randint(*UPPER_LENGTHS)).answer) for _ in range(2000)}
    assert lengths == set(range(UPPER_LENGTHS[0], UPPER_LENGTHS[1] + 1))
    carrying = [sample("addition", rng, held_out=False, carry_rich=1.0) for _ in range(500)]
    carries = sum((int(a) % 10 + int(b) % 10) >= 10 for a, b in (p.prompt[:-1].split("+") for p in carrying))
    assert carries > 0.5 * len(carrying)


def test_boundary_additions_sum_their_digits_to_nine_or_ten_and_stay_in_the_training_split():
    from export.tasks import _is_held_out, sample

    rng = random.Random(1)
    problems = [sample("addition", rng, held_out=False, boundary=1.0) for _ in range(500)]
    pairs = [tuple(map(int, p.prompt[:-1].split("+"))) for p in problems]
    assert all(not _is_held_out("addition", a, b) and int(p.answer) == a + b for (a, b), p in zip(pairs, problems))
    units = [a % 10 + b % 10 for a, b in pairs]
    assert sum(u in (9, 10) for u in units) > 0.6 * len(units)
    assert 0.3 < sum(u == 10 for u in units) / sum(u in (9, 10) for u in units) < 0.7  # both sides of the boundary


def test_held_out_sets_are_those_every_figure_was_measured_on():
    """The quality figures of v1, v2 and its stages compare on the same problems: pin them by hash."""
    import hashlib

    from export.tasks import held_out_set

    def digest(task: str, count: int) -> str:
        return hashlib.sha256("\n".join(p.prompt + p.answer for p in held_out_set(task, count)).encode()).hexdigest()

    assert digest("addition", 500) == "38a5288b0fc422047ff9a6a6a01ce543d5d39d5e38fae0d6d60b7c2216dbafcf"
    assert digest("upper", 200) == "eb1d0333f5668d90a44995210e076de570c613d1a32e57305fc04993b6e4e03f"
