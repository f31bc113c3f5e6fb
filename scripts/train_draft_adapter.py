#!/usr/bin/env python3
"""Train the miniature's draft-only LoRA (`export/miniature/linear_spec_lora/`) on top of the frozen base.

Self-speculation drafts a block in one bidirectional pass and verifies it with one causal pass of the base weights;
a draft token is kept only while it equals what the causal model itself would write. So the adapter is distilled
from the base's own causal decoding: for training-split prompts the base writes its greedy `ar` continuation once
(the teacher), and the adapter learns to draft any block of it in the drafting pass's exact input: the prompt and
the continuation's first j tokens as clean context (causal, base weights: what the cache holds), then the block
`[seed, mask, …, mask]` at positions j, j+1, … seen bidirectionally with the LoRA switched on, its targets the
teacher's next tokens up to the end token; and, for half the batches, the look-ahead row a verifying pass carries
(the block being verified, then a block of masks that drafts the next one). Only the LoRA's A and B train; the written files are PEFT's format, as
the family's instruct checkpoints ship them, and the base checkpoint is not touched.

    python scripts/train_draft_adapter.py [--checkpoint export/miniature] [--steps 1500] [--rank 64 --alpha 256]
        [--upper-share 0.5] [--look-ahead 0.5]

The defaults are the shipped adapter's recipe.

Seeded and deterministic on a given machine; its log goes to `linear_spec_lora/training.json`.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "model_repository" / "dlm" / "1"))

from dlm.refine import GenerationParams, TokenSpec, generate  # noqa: E402
from dlm.runtime import CacheLayout, TorchRuntime  # noqa: E402
from export.adapter import ADAPTER_DIR, DraftAdapter, save_adapter  # noqa: E402
from export.checkpoint import load_checkpoint, load_tokenizer  # noqa: E402
from export.model import DiffusionLM  # noqa: E402
from export.tasks import TASKS, UPPER_LENGTHS, held_out_set, sample  # noqa: E402

UPPER_SHARE = 0.5  # share of the teacher's prompts that are upper-casing (the rest: additions)
BLOCK_CHOICES = (32, 32, 16, 8)
LOOK_AHEAD = 0.5  # share of batches of look-ahead rows (the rest: plain drafting rows)


def teacher_continuations(
    model: DiffusionLM, tokenizer, count: int, rng: random.Random, upper_share: float = UPPER_SHARE
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base's greedy `ar` continuation ending with its end token) for `count` training prompts."""
    config = model.config.to_dict()
    runtime = TorchRuntime(model, CacheLayout.from_config(config))
    spec = TokenSpec.from_config(config)
    tasks, weights = ("addition", "upper"), (1 - upper_share, upper_share)
    problems = []
    for _ in range(count):
        task = rng.choices(tasks, weights)[0]
        length = rng.randint(*UPPER_LENGTHS) if task == "upper" else None
        problems.append(sample(task, rng, held_out=False, length=length))
    pairs = []
    for i in range(0, count, 256):
        chunk = problems[i : i + 256]
        prompts = [tokenizer.encode(p.prompt).ids for p in chunk]
        max_tokens = max(len(p.answer) for p in chunk) + 4
        for prompt, result in zip(prompts, generate(runtime, prompts, GenerationParams(mode="ar", max_tokens=max_tokens), spec)):
            if result.finish_reason == "eos":  # a continuation that never ends teaches nothing about ending
                pairs.append((prompt, result.tokens + [config["eos_token_id"]]))
    return pairs


def make_batch(pairs, config, size: int, block: int, rng: random.Random, look_ahead: bool) -> dict[str, torch.Tensor]:
    """Rows of clean context (prompt + the continuation's first j tokens) then the drafting row's tokens, seen
    bidirectionally with the LoRA on (`draft` marks their columns): `[seed, mask × (block − 1)]` (a drafting pass),
    or with `look_ahead` the block being verified (the continuation's next `block` tokens, what its drafts are once
    all accepted) then `block` masks, which draft the block after it (the look-ahead row of a verifying pass)."""
    rows = []
    long_enough = [(p, a) for p, a in pairs if len(a) > block + 1]  # the verified block holds no end token
    look_ahead = look_ahead and bool(long_enough)
    for _ in range(size):
        prompt, answer = rng.choice(long_enough if look_ahead else pairs)
        if look_ahead:
            j = rng.randrange(len(answer) - block)
            known = answer[j : j + block]
            targets = [answer[j + block + i] if j + block + i < len(answer) else -100 for i in range(block)]
            drafting = known + [config.mask_token_id] * block
            targets = [-100] * block + targets
        else:
            j = rng.randrange(len(answer))  # the block's seed is answer[j], its first position len(prompt) + j
            drafting = [answer[j]] + [config.mask_token_id] * (block - 1)
            targets = [-100] + [answer[j + i] if j + i < len(answer) else -100 for i in range(1, block)]
        rows.append((prompt + answer[:j], drafting, targets))
    clean_width = max(len(c) for c, _, _ in rows)
    width = clean_width + max(len(d) for _, d, _ in rows)
    ids = torch.full((size, width), config.raw.get("pad_token_id", 0), dtype=torch.long)
    pos = torch.zeros(size, width, dtype=torch.long)
    target = torch.full((size, width), -100, dtype=torch.long)
    valid = torch.zeros(size, width, dtype=torch.bool)
    for r, (clean, drafting, targets) in enumerate(rows):
        n, m = len(clean), len(drafting)
        ids[r, :n], pos[r, :n], valid[r, :n] = torch.tensor(clean), torch.arange(n), True
        cols = slice(clean_width, clean_width + m)
        ids[r, cols], pos[r, cols], valid[r, cols] = torch.tensor(drafting), n + torch.arange(m), True
        target[r, cols] = torch.tensor(targets)
    in_block = torch.zeros(width, dtype=torch.bool)
    in_block[clean_width:] = True
    index = torch.arange(width)
    causal = ~in_block[:, None] & ~in_block[None, :] & (index[None, :] <= index[:, None])
    block_to_clean = in_block[:, None] & ~in_block[None, :]
    block_to_block = in_block[:, None] & in_block[None, :]
    allowed = (causal | block_to_clean | block_to_block)[None] & valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    draft = in_block[None].expand(size, width)
    return {"ids": ids, "pos": pos, "allowed": allowed, "target": target, "draft": draft}


def fresh_adapter(model: DiffusionLM, rank: int, alpha: float, out: Path) -> DraftAdapter:
    """PEFT's initialisation: A Kaiming-uniform, B zero, so training starts from the base's own drafts."""
    c = model.config
    lora_a, lora_b = [], []
    for _ in range(c.num_hidden_layers):
        a = torch.empty(rank, c.num_attention_heads * c.head_dim)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        lora_a.append(a)
        lora_b.append(torch.zeros(c.hidden_size, rank))
    return DraftAdapter(out, rank, float(alpha), tuple(lora_a), tuple(lora_b), sha256="")


def trainable_adapter(model: DiffusionLM, rank: int, alpha: float, out: Path) -> list[torch.nn.Parameter]:
    """Freeze every base weight, attach a fresh draft adapter and return its parameters, the only ones that train."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.attach_draft_adapter(fresh_adapter(model, rank, alpha, out))
    lora = [p for n, p in model.named_parameters() if ".draft_lora." in n]
    for p in lora:
        p.requires_grad_(True)
    return lora


def make_optimizer(lora: list[torch.nn.Parameter], lr: float, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the adapter's parameters only, a linear warm-up over the first 5 % of the steps, then cosine."""
    optimizer = torch.optim.AdamW(lora, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


def train_step(model: DiffusionLM, batch: dict[str, torch.Tensor], lora: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR) -> float:
    """One step on one batch: cross-entropy of the drafting rows' targets, gradients clipped to norm 1; the loss."""
    logits, _ = model.forward_with_mask(batch["ids"], batch["pos"], batch["allowed"], draft=batch["draft"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1), ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora, 1.0)
    optimizer.step()
    schedule.step()
    return float(loss.item())


def speculative_report(model: DiffusionLM, tokenizer, count: int) -> dict[str, dict[str, float]]:
    """Held-out `speculative` with and without the adapter: accuracy, tokens per forward, acceptance length."""
    config = model.config.to_dict()
    runtime = TorchRuntime(model, CacheLayout.from_config(config))
    spec = TokenSpec.from_config(config)
    report = {}
    for task in TASKS:
        problems = held_out_set(task, count)
        prompts = [tokenizer.encode(p.prompt).ids for p in problems]
        max_tokens = max(len(p.answer) for p in problems) + 8
        for use in (False, True):
            params = GenerationParams(mode="speculative", max_tokens=max_tokens, draft_adapter=use)
            results = generate(runtime, prompts, params, spec)
            texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
            report[f"{task}, {'with' if use else 'without'} adapter"] = {
                "accuracy": round(sum(t == p.answer for t, p in zip(texts, problems)) / count, 4),
                "tokens_per_forward": round(sum(r.num_tokens for r in results)
                                            / max(1, sum(r.num_forwards - 1 for r in results)), 3),
                "acceptance_length": round(sum(r.verified_tokens for r in results)
                                           / max(1, sum(r.verify_passes for r in results)), 3),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("export/miniature"))
    parser.add_argument("--out", type=Path, help=f"default: CHECKPOINT/{ADAPTER_DIR}")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=256.0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher-prompts", type=int, default=8192)
    parser.add_argument("--upper-share", type=float, default=UPPER_SHARE,
                        help="share of upper-casing prompts among the teacher's (the long answers look-ahead needs)")
    parser.add_argument("--look-ahead", type=float, default=LOOK_AHEAD, help="share of batches of look-ahead rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = args.out or args.checkpoint / ADAPTER_DIR
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()

    model = load_checkpoint(args.checkpoint, dtype="float32")
    tokenizer = load_tokenizer(args.checkpoint)
    with torch.no_grad():
        pairs = teacher_continuations(model, tokenizer, args.teacher_prompts, rng, args.upper_share)
    print(f"{len(pairs)} teacher continuations in {time.time() - started:.0f}s", flush=True)
    lora = trainable_adapter(model, args.rank, args.alpha, out)
    optimizer, schedule = make_optimizer(lora, args.lr, args.steps)
    log, losses = [], []
    for step in range(1, args.steps + 1):
        batch = make_batch(pairs, model.config, args.batch_size, rng.choice(BLOCK_CHOICES), rng,
                           look_ahead=rng.random() < args.look_ahead)
        losses.append(train_step(model, batch, lora, optimizer, schedule))
        if step % 100 == 0 or step == args.steps:
            entry = {"step": step, "loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                     "minutes": round((time.time() - started) / 60, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)

    model.eval()
    layers = model.draft_loras()
    save_adapter(out, [lo.lora_A.weight.detach() for lo in layers], [lo.lora_B.weight.detach() for lo in layers],
                 args.rank, args.alpha, base_model=str(args.checkpoint))
    with torch.no_grad():
        report = speculative_report(model, tokenizer, 200)
    print(json.dumps(report, indent=2))
    record = {"checkpoint": str(args.checkpoint), "rank": args.rank, "alpha": args.alpha, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "teacher_prompts": args.teacher_prompts,
              "teacher_continuations": len(pairs), "seed": args.seed, "threads": args.threads,
              "task_weights": {"addition": 1 - args.upper_share, "upper": args.upper_share},
              "block_choices": BLOCK_CHOICES, "look_ahead": args.look_ahead,
              "training_minutes": round((time.time() - started) / 60, 1), "log": log,
              "held_out_200_speculative": report}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
