"""The bf16 model against the same weights in fp32, on the passes serving runs (the check a bf16 graph gets on a
CPU, where ONNX Runtime has no bfloat16 kernels; the graph itself runs under TensorRT).

Inputs: text prompts tokenized with the checkpoint's tokenizer: six held-out task problems (the source the quantize
command compares on) and two few-shot prompts (solved training problems, one per line, then a held-out one) that
fill the context up to 1024 positions. The serving loop itself decodes them (`dlm.refine.generate`: causal prefill,
then bidirectional denoising passes over `[seed, mask, ...]` blocks and the causal pass that writes each finished
block; half the prompts in `speculative` mode, whose drafting rows run the draft-only LoRA where there is one).
Every pass runs both models on the same host inputs, each reading the KV cache it wrote itself; the loop follows
fp32's picks.

Judged, relative to fp32 at every predicted position (a bf16 logit is off by about 2^-8 of its size, so a raw
logit difference says little; what decoding reads is the best candidate and its probability):
- where fp32 is confident (best candidate's probability ≥ `CONFIDENT`, the loop's default commit threshold), bf16
  must pick the same best candidate at ≥ `AGREEMENT` of the positions;
- the confidence (probability of fp32's best candidate, exp(logit − logsumexp)) may differ by `tolerance` on
  average; the log-sum-exp's error and the largest confidence error are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dlm.candidates import Candidates
from dlm.contract import EngineContract, Profile
from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime
from export.checkpoint import load_tokenizer
from export.model import DiffusionLM
from export.onnx_export import ExportError
from export.quantize import calibration_problems, evaluation_problems

PROMPTS = 8  # held-out prompts decoded, the tasks taking turns
LONG_PROMPTS = 2  # of which few-shot prompts that fill the context
LONGEST_CONTEXT = 1024  # positions the long prompts reach at most: enough for a fault to show, bounded CPU time
CONFIDENT = 0.9  # fp32's best-candidate probability from which bf16 must pick the same
AGREEMENT = 0.99  # share of confident positions where it must


@dataclass(frozen=True)
class ComparedPass:
    causal: np.ndarray  # [B]
    positions: np.ndarray  # [B, N]: logit_positions (padding repeats the last real one)
    reference: Candidates
    candidate: Candidates


class PairedRuntime:
    """A `dlm.runtime.Runtime` that runs every pass on two models with their own caches and hands the loop the
    reference's candidates; the pairs of outputs are kept in `passes`."""

    def __init__(self, reference: DiffusionLM, candidate: DiffusionLM, contract: EngineContract):
        self.layout = CacheLayout(contract.num_layers, contract.num_kv_heads, contract.head_dim)
        self.runtimes = (TorchRuntime(reference, self.layout), TorchRuntime(candidate, self.layout))
        for runtime in self.runtimes:
            runtime.profile = contract.profile
        self.profile: Profile = contract.profile
        self.has_draft_adapter = contract.draft_adapter
        self.slots = self.context = 0
        self.passes: list[ComparedPass] = []
        self.longest = 0  # the most positions (cache and new tokens) a row reached

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None:
        for runtime in self.runtimes:
            runtime.allocate(slots, context, pass_tokens)
        self.slots, self.context = slots, context

    def forward(self, slots: np.ndarray, input_ids: np.ndarray, position_ids: np.ndarray, new_mask: np.ndarray,
                cache_lengths: np.ndarray, causal: np.ndarray, logit_positions: np.ndarray,
                draft: np.ndarray | None = None,
                token_bitmask: tuple[np.ndarray, np.ndarray] | None = None) -> Candidates:
        want, got = (r.forward(slots, input_ids, position_ids, new_mask, cache_lengths, causal, logit_positions, draft,
                               token_bitmask) for r in self.runtimes)
        self.passes.append(ComparedPass(causal.copy(), logit_positions.copy(), want, got))
        self.longest = max(self.longest, int((cache_lengths + new_mask.sum(1)).max()))
        return want

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for runtime in self.runtimes:
            runtime.commit(slots, starts, counts)


def text_encoder(checkpoint: Path, config: dict[str, Any], log: Callable[[str], None]) -> Callable[[str], list[int]]:
    """The checkpoint's tokenizer; without `tokenizer.json` (a random-weight test checkpoint), each character
    becomes a fixed random id other than the mask id (logged)."""
    if (checkpoint / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(checkpoint)
        return lambda text: tokenizer.encode(text).ids
    log(f"  no tokenizer.json in {checkpoint}: each character of the prompts becomes a fixed random id")
    ids = np.setdiff1d(np.arange(config["vocab_size"]), [config["mask_token_id"]])
    table = np.random.default_rng(0).choice(ids, 256).tolist()
    return lambda text: [table[ord(c) % 256] for c in text]


def validation_prompts(encode: Callable[[str], list[int]], longest: int) -> list[list[int]]:
    """`PROMPTS` held-out task prompts of at most `longest` tokens. The last `LONG_PROMPTS` come after as many
    solved training problems, one per line, as fit: few-shot prompts that reach far positions, where a fault in
    position-dependent arithmetic (RoPE, the query scaling) shows; on short prompts alone it hides."""
    questions = [p.prompt for p in evaluation_problems(PROMPTS)]
    prompts = [encode(q)[:longest] for q in questions[: PROMPTS - LONG_PROMPTS]]
    shots = [p.prompt + p.answer for p in calibration_problems(longest)]  # more than fit: each is 2+ tokens
    for question in questions[PROMPTS - LONG_PROMPTS:]:
        text = question
        for shot in shots:
            if len(encode(f"{shot}\n{text}")) > longest:
                break
            text = f"{shot}\n{text}"
        prompts.append(encode(text)[:longest])
    return prompts


def decode_paired(
    reference: DiffusionLM, candidate: DiffusionLM, contract: EngineContract, checkpoint: Path,
    log: Callable[[str], None],
) -> PairedRuntime:
    """Decode the validation prompts (two blocks each at most) on both models; the runtime keeps every pass."""
    config = reference.config.to_dict()
    block = config["block_size"]
    context = min(contract.profile.max_context, config["max_position_embeddings"], LONGEST_CONTEXT)
    max_tokens = 2 * block if context > 3 * block else block
    prompts = validation_prompts(text_encoder(checkpoint, config, log), max(1, context - max_tokens - block))
    runtime = PairedRuntime(reference, candidate, contract)
    modes = ("diffusion", "speculative")
    params = [GenerationParams(mode=modes[i % 2], max_tokens=max_tokens) for i in range(len(prompts))]
    generate(runtime, prompts, params, TokenSpec.from_config(config))
    return runtime


def position_figures(compared: ComparedPass) -> dict[str, np.ndarray]:
    """Per predicted position (padding repeats left out): fp32's confidence, whether bf16's best candidate is the
    same, bf16's confidence in fp32's best candidate (0 where that is not among its K), the log-sum-exps' error,
    and whether the row is causal."""
    want, got = compared.reference, compared.candidate
    real = np.ones(compared.positions.shape, dtype=bool)
    real[:, 1:] = compared.positions[:, 1:] != compared.positions[:, :-1]
    best = want.tokens[..., :1]
    confidence = np.exp(want.logits[..., 0] - want.logsumexp)
    found = got.tokens == best
    got_logit = np.where(found, got.logits, -np.inf).max(-1)
    return {
        "confidence": confidence[real],
        "agree": (got.tokens[..., 0] == best[..., 0])[real],
        "confidence_error": np.abs(np.exp(got_logit - got.logsumexp) - confidence)[real],
        "logsumexp_error": np.abs(got.logsumexp - want.logsumexp)[real],
        "causal": np.broadcast_to(compared.causal[:, None], real.shape)[real],
    }


def summarize(figures: dict[str, np.ndarray]) -> dict[str, Any]:
    confident = figures["confidence"] >= CONFIDENT
    return {
        "positions": int(confident.size),
        "confident_positions": int(confident.sum()),
        "confident_agreement": float(figures["agree"][confident].mean()) if confident.any() else 1.0,
        "argmax_agreement": float(figures["agree"].mean()),
        "mean_confidence_error": float(figures["confidence_error"].mean()),
        "max_confidence_error": float(figures["confidence_error"].max()),
        "max_logsumexp_error": float(figures["logsumexp_error"].max()),
    }


def validate_bf16(
    model: DiffusionLM, reference: DiffusionLM, contract: EngineContract, checkpoint: Path,
    tolerance: float, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Decode the validation prompts with fp32 `reference` and bf16 `model` side by side; ExportError when bf16
    changes fp32's confident picks or its confidences more than allowed. Returns the figures."""
    log("PyTorch bf16 against PyTorch fp32 on the passes the decoding loop runs (ONNX Runtime's CPU kernels have "
        "no bfloat16):")
    runtime = decode_paired(reference, model, contract, checkpoint, log)
    passes = runtime.passes
    per_position = [position_figures(p) for p in passes]
    figures = {name: np.concatenate([f[name] for f in per_position]) for name in per_position[0]}
    report: dict[str, Any] = {"against": "pytorch fp32", "passes": len(passes), "prompts": PROMPTS,
                              "long_prompts": LONG_PROMPTS, "longest_context": runtime.longest,
                              "confident": CONFIDENT, "agreement_floor": AGREEMENT, "tolerance": tolerance}
    for kind, rows in (("causal", figures["causal"]), ("bidirectional", ~figures["causal"])):
        if not rows.any():  # every prompt ended at its prefill
            continue
        report[kind] = summarize({name: values[rows] for name, values in figures.items()})
        s = report[kind]
        log(f"  {kind:13s} {s['positions']:5d} positions ({s['confident_positions']} confident): same best "
            f"candidate {s['confident_agreement']:.4f} where confident, {s['argmax_agreement']:.4f} overall; "
            f"|Δ confidence| mean {s['mean_confidence_error']:.2g}, max {s['max_confidence_error']:.2g}; "
            f"max |Δ logsumexp| {s['max_logsumexp_error']:.2g}")
    report |= summarize(figures)
    log(f"{PROMPTS} prompts ({LONG_PROMPTS} few-shot, up to {runtime.longest} positions), {len(passes)} passes: "
        f"same best candidate at {report['confident_agreement']:.2%} of the {report['confident_positions']} "
        f"positions where fp32's confidence ≥ {CONFIDENT:g} (floor {AGREEMENT:.0%}); mean |Δ confidence| {report['mean_confidence_error']:.2g} (tolerance {tolerance:g})")
    if report["confident_agreement"] < AGREEMENT:
        raise ExportError(
            f"the bf16 model picks another best candidate than fp32 at {1 - report['confident_agreement']:.2%} of "
            f"the positions where fp32 is confident (≥ {CONFIDENT:g}), more than {1 - AGREEMENT:.0%}; see the "
            f"figures above"
        )
    if not report["mean_confidence_error"] <= tolerance:
        raise ExportError(
            f"the bf16 model's confidences differ from fp32's by {report['mean_confidence_error']:.3g} on average, "
            f"more than the tolerance {tolerance:g}; see the figures above"
        )
    return report
