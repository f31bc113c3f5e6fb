#!/usr/bin/env python3
"""Train the miniature Nemotron-Labs Diffusion checkpoint from scratch on the CPU (writes `export/miniature/`).

The objective is the family's joint one: autoregressive cross-entropy on the clean sequence, plus masked-diffusion
cross-entropy on a noised copy of the answer's blocks, in a single forward under the block-causal mask: the clean
tokens attend causally, each noised block attends to the clean prefix before it and bidirectionally to itself. As in
decoding, a block's first token (the seed, which the causal pass predicts) is never masked, and answers are padded
with end tokens to a whole number of blocks, so the model learns to fill a block's tail with end tokens.

Seeded and deterministic on a given machine: `python scripts/train_miniature.py` reproduces the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.checkpoint import save_checkpoint  # noqa: E402
from export.config import ModelConfig  # noqa: E402
from export.model import DiffusionLM  # noqa: E402
from export.tasks import TASKS, sample  # noqa: E402

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
VOCAB_SIZE = 128

MINIATURE_CONFIG = {
    "architectures": ["NemotronLabsDiffusionModel"],
    "model_type": "nemotron_labs_diffusion",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "yarn",
        # a lower base than the real 1e6 gives a 32-wide head enough high frequencies to tell digits apart
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "mask_token_id": 4,
    "block_size": 32,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "use_cache": True,
    "dtype": "bfloat16",
}
TASK_WEIGHTS = {"addition": 0.8, "upper": 0.2}
BLOCK_CHOICES = (32, 32, 16, 8)  # mostly the config's block size; smaller ones so block_length can be turned


def build_tokenizer() -> Tokenizer:
    """Character-level tokenizer whose post-processor adds the BOS token, as the real tokenizer.json does."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), VOCAB_SIZE)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tokenizer


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, config: dict) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "mask_token_id": config["mask_token_id"],
        "block_size": config["block_size"],
        "threshold": 0.9,
        "do_sample": False,
        "max_new_tokens": 64,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def make_batch(
    tokenizer: Tokenizer, config: ModelConfig, task: str, size: int, block: int, rng: random.Random
) -> dict[str, torch.Tensor]:
    """Clean sequences and noised answer blocks side by side in one row, with the block-causal mask."""
    eos, mask_id = config.eos_token_id, config.mask_token_id
    rows = []
    for _ in range(size):
        problem = sample(task, rng, held_out=False)
        prompt = tokenizer.encode(problem.prompt).ids
        answer = tokenizer.encode(problem.answer, add_special_tokens=False).ids + [eos]
        padded = answer + [eos] * (-len(answer) % block)
        noisy = list(padded)
        masked = [False] * len(padded)
        for start in range(0, len(padded), block):
            ratio = rng.random()
            picks = [j for j in range(start + 1, start + block) if rng.random() < ratio]
            for j in picks or [rng.randrange(start + 1, start + block)]:
                noisy[j], masked[j] = mask_id, True
        rows.append((prompt, answer, padded, noisy, masked))

    n_clean = max(len(p) + len(a) for p, a, *_ in rows)
    n_noisy = max(len(pad) for _, _, pad, _, _ in rows)
    width = n_clean + n_noisy
    ids = torch.full((size, width), config.raw.get("pad_token_id", 0), dtype=torch.long)
    pos = torch.zeros(size, width, dtype=torch.long)
    ar_target = torch.full((size, width), -100, dtype=torch.long)
    dlm_target = torch.full((size, width), -100, dtype=torch.long)
    # per token: is it a noised token, its index, and which keys it may see
    is_noisy = torch.zeros(size, width, dtype=torch.bool)
    valid = torch.zeros(size, width, dtype=torch.bool)
    clean_limit = torch.zeros(size, width, dtype=torch.long)  # noised token: clean keys below this index
    block_id = torch.full((size, width), -1, dtype=torch.long)
    for r, (prompt, answer, padded, noisy, masked) in enumerate(rows):
        clean = prompt + answer
        n, lp = len(clean), len(prompt)
        ids[r, :n] = torch.tensor(clean)
        pos[r, :n] = torch.arange(n)
        valid[r, :n] = True
        ar_target[r, lp - 1 : n - 1] = torch.tensor(answer)  # shifted: logit i predicts token i + 1
        m = len(padded)
        cols = slice(n_clean, n_clean + m)
        ids[r, cols] = torch.tensor(noisy)
        pos[r, cols] = lp + torch.arange(m)
        valid[r, cols] = True
        is_noisy[r, cols] = True
        block_id[r, cols] = torch.arange(m) // block
        clean_limit[r, cols] = lp + (torch.arange(m) // block) * block
        dlm_target[r, cols] = torch.where(torch.tensor(masked), torch.tensor(padded), torch.tensor(-100))
    index = torch.arange(width)
    q_noisy, k_noisy = is_noisy[:, :, None], is_noisy[:, None, :]
    clean_to_clean = ~q_noisy & ~k_noisy & (index[None, None, :] <= index[None, :, None])
    noisy_to_clean = q_noisy & ~k_noisy & (index[None, None, :] < clean_limit[:, :, None])
    noisy_to_noisy = q_noisy & k_noisy & (block_id[:, :, None] == block_id[:, None, :])
    allowed = (clean_to_clean | noisy_to_clean | noisy_to_noisy) & valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding rows see themselves, never an empty softmax
    return {"ids": ids, "pos": pos, "allowed": allowed, "ar_target": ar_target, "dlm_target": dlm_target}


def loss_on(model: DiffusionLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    logits, _ = model.forward_with_mask(batch["ids"], batch["pos"], batch["allowed"])
    flat = logits.reshape(-1, logits.shape[-1])
    ar = F.cross_entropy(flat, batch["ar_target"].reshape(-1), ignore_index=-100)
    dlm = F.cross_entropy(flat, batch["dlm_target"].reshape(-1), ignore_index=-100)
    return ar + dlm, ar.item(), dlm.item()


def train(
    config_dict: dict,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
    on_checkpoint=None,
    checkpoint_every: int = 0,
) -> tuple[DiffusionLM, list[float]]:
    """Train from scratch; returns the model (fp32) and the loss of every step."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ModelConfig.from_dict(config_dict)
    tokenizer = build_tokenizer()
    model = DiffusionLM(config).float()
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    tasks, weights = zip(*TASK_WEIGHTS.items())
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in range(steps):
        task = rng.choices(tasks, weights)[0]
        block = min(rng.choice(BLOCK_CHOICES), config.block_size)
        batch = make_batch(tokenizer, config, task, batch_size, block, rng)
        loss, ar, dlm = loss_on(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:6d}  loss {float(loss):.4f}  ar {ar:.4f}  diffusion {dlm:.4f}  {task:8s} "
                  f"block {block:2d}  {time.time() - start:7.1f}s", flush=True)
        if on_checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            model.eval()
            on_checkpoint(model, step + 1)
            model.train()
    model.eval()
    return model, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "export" / "miniature")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="also write the checkpoint every N steps")
    args = parser.parse_args()
    assert set(TASK_WEIGHTS) == set(TASKS)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(build_tokenizer(), args.out, MINIATURE_CONFIG)

    def checkpoint(model: DiffusionLM, step: int) -> None:
        save_checkpoint(model, args.out, dtype="bfloat16")
        print(f"checkpoint at step {step} written to {args.out}", flush=True)

    model, losses = train(
        MINIATURE_CONFIG, args.steps, args.batch_size, args.lr, args.seed,
        on_checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
    )
    minutes = (time.time() - started) / 60
    save_checkpoint(model, args.out, dtype="bfloat16")
    record = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "training_minutes": round(minutes, 1),
        "final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
        "task_weights": TASK_WEIGHTS,
        "block_choices": BLOCK_CHOICES,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} after {minutes:.1f} min of training")


if __name__ == "__main__":
    main()
