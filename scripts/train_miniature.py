#!/usr/bin/env python3
"""Train the miniature Nemotron-Labs Diffusion checkpoint from scratch on the CPU (writes `export/miniature/`).

The objective is the family's joint one: autoregressive cross-entropy on the clean sequence, plus masked-diffusion
cross-entropy on a noised copy of the answer's blocks, in a single forward under the block-causal mask: the clean
tokens attend causally, each noised block attends to the clean prefix before it and bidirectionally to itself. As in
decoding, a block's first token (the seed, which the causal pass predicts) is never masked, and answers are padded
with end tokens to a whole number of blocks, so the model learns to fill a block's tail with end tokens.

Version 2 adds a curriculum: half of the additions are drawn with carrying digits (carries and carry chains are
what most-significant-digit-first addition gets wrong, and every held-out sum carries out of its units column), and
the upper-casing task draws any length from 1 to 48 letters. The shipped v2 weights continue from the v1 weights
(`--init`, recorded with their hash in `training.json`); without `--init` the model starts from random weights. Its
third stage adds `--boundary`: a share of additions whose aligned digit pairs sum to exactly 9 or 10, the pairs that
tell a carry from none, where v2's remaining errors were.

Seeded and deterministic on a given machine, and resumable: the full training state (fp32 weights, optimizer,
schedule, data stream, step, log) is saved every `--save-every` steps to `--state`, and `--resume` continues from it,
so a long run can be split across sessions and gives the same weights as an unbroken one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from export.config import ModelConfig  # noqa: E402
from export.model import DiffusionLM  # noqa: E402
from export.tasks import TASKS, UPPER_LENGTHS, held_out_set, sample  # noqa: E402

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
# upper-casing of any length needs a copy circuit v1 (36 letters only) never learned: a third of the batches
UPPER_SHARE = 0.35
BLOCK_CHOICES = (32, 32, 16, 8)  # mostly the config's block size; smaller ones so block_length can be turned
CARRY_RICH = 0.5  # share of additions drawn with carrying digits
DEFAULT_STATE = ROOT / "build" / "miniature_training" / "state.pt"


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
    tokenizer: Tokenizer, config: ModelConfig, task: str, size: int, block: int, rng: random.Random,
    carry_rich: float = CARRY_RICH, boundary: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Clean sequences and noised answer blocks side by side in one row, with the block-causal mask."""
    eos, mask_id = config.eos_token_id, config.mask_token_id
    rows = []
    for _ in range(size):
        length = rng.randint(*UPPER_LENGTHS) if task == "upper" else None
        problem = sample(task, rng, held_out=False, carry_rich=carry_rich, length=length, boundary=boundary)
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


@dataclass
class Recipe:
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    seed: int = 0
    upper_share: float = UPPER_SHARE  # share of batches of the upper-casing task (the rest: additions)
    carry_rich: float = CARRY_RICH  # share of additions drawn with carrying digits
    boundary: float = 0.0  # share of additions whose digit pairs sum to exactly 9 or 10 (drawn before carry_rich)

    @property
    def task_weights(self) -> dict[str, float]:
        return {"addition": 1 - self.upper_share, "upper": self.upper_share}


def lr_factor(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak at the last step."""
    warm = min(1.0, (step + 1) / max(1, recipe.warmup))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, recipe.steps) / recipe.steps)))


def held_out_accuracy(model: DiffusionLM, tokenizer: Tokenizer, count: int = 200) -> dict[str, float]:
    """Greedy `ar` and diffusion (threshold 0.9) exact match on held-out additions: the log's progress signal."""
    from dlm.refine import GenerationParams, TokenSpec, generate
    from dlm.runtime import CacheLayout, TorchRuntime

    config = model.config.to_dict()
    runtime = TorchRuntime(model, CacheLayout.from_config(config))
    spec = TokenSpec.from_config(config)
    problems = held_out_set("addition", count)
    prompts = [tokenizer.encode(p.prompt).ids for p in problems]
    out = {}
    for mode in ("ar", "diffusion"):
        results = generate(runtime, prompts, GenerationParams(mode=mode, threshold=0.9, max_tokens=8), spec)
        texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        out[mode] = round(sum(t == p.answer for t, p in zip(texts, problems)) / count, 4)
    return out


class Trainer:
    """Model, optimizer, schedule and data stream; `state()` / `load_state()` make a run resumable."""

    def __init__(self, config_dict: dict, recipe: Recipe, init: Path | None = None):
        self.recipe = recipe
        torch.manual_seed(recipe.seed)
        self.rng = random.Random(recipe.seed)
        self.config = ModelConfig.from_dict(config_dict)
        self.tokenizer = build_tokenizer()
        self.model = DiffusionLM(self.config).float()
        if init is None:
            for p in self.model.parameters():
                if p.dim() == 2:
                    torch.nn.init.normal_(p, std=0.02)
        else:
            self.model.load_state_dict(load_checkpoint(init, dtype="float32").state_dict())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(recipe, s))
        self.step = 0
        self.losses: list[float] = []
        self.log: list[dict] = []
        self.seconds = 0.0  # training time over all sessions of the run

    def state(self) -> dict:
        return {
            "recipe": asdict(self.recipe), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
            "step": self.step, "losses": self.losses, "log": self.log, "seconds": self.seconds,
        }

    def load_state(self, state: dict) -> None:
        defaults = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
        saved = {**defaults, **state["recipe"]}  # a field added since the state was saved has its default
        if saved != asdict(self.recipe):
            raise SystemExit(f"the saved state was made with {saved}, not {asdict(self.recipe)}: "
                             "resume with the same options")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.losses, self.log, self.seconds = state["step"], state["losses"], state["log"], state["seconds"]

    def train_step(self) -> dict:
        tasks, weights = zip(*self.recipe.task_weights.items())
        task = self.rng.choices(tasks, weights)[0]
        block = min(self.rng.choice(BLOCK_CHOICES), self.config.block_size)
        batch = make_batch(self.tokenizer, self.config, task, self.recipe.batch_size, block, self.rng,
                           self.recipe.carry_rich, self.recipe.boundary)
        self.model.train()
        loss, ar, dlm = loss_on(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.model.eval()
        self.losses.append(loss.item())
        self.step += 1
        return {"loss": loss.item(), "ar": ar, "diffusion": dlm, "task": task, "block": block}


def train(
    config_dict: dict,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
) -> tuple[DiffusionLM, list[float]]:
    """Train from scratch in one go; returns the model (fp32) and the loss of every step."""
    trainer = Trainer(config_dict, Recipe(steps, batch_size, lr, max(1, min(200, steps // 10)), seed))
    while trainer.step < steps:
        trainer.train_step()
    return trainer.model, trainer.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "export" / "miniature")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights instead of random ones")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upper-share", type=float, default=UPPER_SHARE, help="share of upper-casing batches")
    parser.add_argument("--carry-rich", type=float, default=CARRY_RICH,
                        help="share of additions drawn with carrying digits")
    parser.add_argument("--boundary", type=float, default=0.0,
                        help="share of additions whose digit pairs sum to exactly 9 or 10")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="where the resumable training state lives")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    parser.add_argument("--save-every", type=int, default=250, help="save the training state every N steps")
    parser.add_argument("--eval-every", type=int, default=500, help="log held-out accuracy every N steps (0: never)")
    parser.add_argument("--stop-after", type=float, help="save the state and stop after this many minutes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    recipe = Recipe(args.steps, args.batch_size, args.lr, args.warmup, args.seed, args.upper_share, args.carry_rich,
                    args.boundary)
    trainer = Trainer(MINIATURE_CONFIG, recipe, init=None if args.resume else args.init)
    init_record = None
    if args.init is not None:
        weights = args.init / "model.safetensors"
        init_record = {"checkpoint": str(args.init), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
        if (args.init / "training.json").is_file():
            init_record["training"] = json.loads((args.init / "training.json").read_text())
    if args.resume:
        state = torch.load(args.state, weights_only=False)
        trainer.load_state(state)
        init_record = state.get("init", init_record)
        print(f"resumed at step {trainer.step} of {recipe.steps} from {args.state}", flush=True)
    args.state.parent.mkdir(parents=True, exist_ok=True)

    def save_state() -> None:
        tmp = args.state.with_suffix(".tmp")
        torch.save(trainer.state() | {"init": init_record}, tmp)
        tmp.replace(args.state)

    session_start = time.time()
    seconds_before = trainer.seconds
    while trainer.step < recipe.steps:
        info = trainer.train_step()
        trainer.seconds = seconds_before + time.time() - session_start
        step = trainer.step
        if step % 100 == 0 or step == recipe.steps:
            recent = trainer.losses[-100:]
            entry: dict[str, Any] = {
                "step": step, "loss_mean_last_100": round(sum(recent) / len(recent), 4),
                "lr": round(float(trainer.schedule.get_last_lr()[0]), 6), "minutes": round(trainer.seconds / 60, 1)}
            if args.eval_every and (step % args.eval_every == 0 or step == recipe.steps):
                entry["held_out_200_additions"] = held_out_accuracy(trainer.model, trainer.tokenizer)
            trainer.log.append(entry)
            print(json.dumps(entry), flush=True)
        if step % args.save_every == 0 or step == recipe.steps:
            save_state()
        if args.stop_after and (time.time() - session_start) / 60 >= args.stop_after and step < recipe.steps:
            save_state()
            print(f"stopped at step {step}; continue with --resume", flush=True)
            return

    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(build_tokenizer(), args.out, MINIATURE_CONFIG)
    save_checkpoint(trainer.model, args.out, dtype="bfloat16")
    record = {
        "version": 2,
        "recipe": asdict(recipe),
        "threads": args.threads,
        "init": init_record,
        "training_minutes": round(trainer.seconds / 60, 1),
        "final_loss_mean_last_100": round(sum(trainer.losses[-100:]) / len(trainer.losses[-100:]), 4),
        "task_weights": recipe.task_weights,
        "carry_rich": recipe.carry_rich,
        "boundary": recipe.boundary,
        "upper_lengths": UPPER_LENGTHS,
        "block_choices": BLOCK_CHOICES,
        "log": trainer.log,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} after {trainer.seconds / 60:.1f} min of training")


if __name__ == "__main__":
    main()
