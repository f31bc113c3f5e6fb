"""Each mode of the decoding loop (`dlm.refine`, the code Triton runs) against a reference decoder written from
DESIGN §2a on transformers' `Ministral3ForCausalLM` (`reference_decoding`): at temperature 0 in fp32, token for
token, with the same number of forward passes where the two count the same thing.

Two models: the shipped miniature (trained; its draft adapter in `linear_spec_lora/`) and a random-weight
checkpoint in the published layout (real vocabulary, head size, query and KV heads, ids, sharded bf16 safetensors
with an index, a PEFT adapter of rank 128 and alpha 512). Our loop decodes all prompts of a test as one batch; the
reference decodes them one by one, where its batch-wide rules (end tokens, the number of passes) are per row. The
deliberate differences (README) are tested for the part that must still agree: per-row end handling against the
reference's batch-wide one, `max_tokens` not a multiple of the block, no over-run of `max_tokens` in `speculative`,
the look-ahead drafting row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import reference_decoding as ref
from conftest import MINIATURE
from dlm import refine
from dlm.refine import Generation, GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime
from dlm.special_tokens import end_token_ids
from export.adapter import ADAPTER_DIR, attach_adapter, save_adapter
from export.checkpoint import load_checkpoint, save_checkpoint
from export.config import ModelConfig
from export.model import DiffusionLM
from export.random_checkpoint import real_scale_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Pair:
    """Our loop's runtime over a checkpoint, the reference over the same files, the prompts, and the shape of the
    requests: `block` (the block length), `max_tokens` (a multiple of it) and `speculative_max_tokens`."""

    name: str
    runtime: TorchRuntime
    spec: TokenSpec
    reference: ref.Reference
    prompts: list[list[int]]
    block: int
    max_tokens: int
    speculative_max_tokens: int

    @property
    def eos(self) -> frozenset[int]:
        return self.spec.eos_token_ids

    def ours(self, params: GenerationParams, prompts: list[list[int]] | None = None) -> list[Generation]:
        """Our loop over all prompts as one batch (rows share passes, as in Triton)."""
        return generate(self.runtime, prompts or self.prompts, params, self.spec)

    def ar(self, x: torch.Tensor, max_tokens: int) -> ref.Output:
        return ref.ar_generate(self.reference, x, max_tokens, self.eos)

    def diffusion(self, x: torch.Tensor, max_tokens: int, block: int, threshold: float | None = None,
                  steps: int | None = None) -> ref.Output:
        return ref.generate(self.reference, x, max_tokens, block, self.spec.mask_token_id, self.eos, threshold, steps)

    def speculative(self, x: torch.Tensor, max_tokens: int, block: int, draft_lora: bool = True) -> ref.Output:
        return ref.linear_spec_generate(self.reference, x, max_tokens, block, self.spec.mask_token_id, self.eos,
                                        draft_lora)

    def each_prompt(self, decode: Callable[[torch.Tensor], ref.Output]) -> list[ref.Output]:
        """The reference over each prompt alone (batch 1), where its batch-wide rules are per row."""
        return [decode(torch.tensor([prompt])) for prompt in self.prompts]

    def assert_same(self, got: list[Generation], want: list[ref.Output], max_tokens: int,
                    forwards: bool = True) -> None:
        for prompt, g, w in zip(self.prompts, got, want):
            assert (g.tokens, g.finish_reason) == as_ours(w.tokens[0], self.eos, max_tokens), f"prompt {prompt}"
            if forwards:
                # ours counts the prefill and every pass of the row; the reference's diffusion counts no prefill
                # but a causal pass after every block, the last included, which ours never runs: the totals agree
                assert g.num_forwards == w.nfe, f"prompt {prompt}"


def as_ours(tokens: list[int], eos: frozenset[int], max_tokens: int) -> tuple[list[int], str]:
    """A reference output as our loop reports it: cut at the first end token (which is not returned) or at
    `max_tokens`, and the finish reason."""
    for i, token in enumerate(tokens[:max_tokens]):
        if token in eos:
            return tokens[:i], "eos"
    return tokens[:max_tokens], "length"


def load_pair(name: str, checkpoint: Path, prompts: list[list[int]], block: int, max_tokens: int,
              speculative_max_tokens: int) -> Pair:
    config = json.loads((checkpoint / "config.json").read_text())
    model = load_checkpoint(checkpoint, "float32")
    attach_adapter(model, checkpoint)
    runtime = TorchRuntime(model, CacheLayout.from_config(config))
    spec = TokenSpec.from_config(config, end_token_ids(checkpoint))
    reference = ref.load_reference(checkpoint, checkpoint / ADAPTER_DIR)
    return Pair(name, runtime, spec, reference, prompts, block, max_tokens, speculative_max_tokens)


def miniature_tokens(*texts: str) -> list[list[int]]:
    from export.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(MINIATURE)
    return [tokenizer.encode(text).ids for text in texts]


@pytest.fixture(scope="module")
def miniature_pair() -> Pair:
    """The shipped miniature at its own block length (32), two blocks. Its prompts' answers end at once, early,
    late, in the second block, near training's longest (a 70-letter prompt, longer than any trained on), and out
    of distribution (where the draft adapter's drafts differ from the base weights')."""
    prompts = miniature_tokens("12+34=", "905+7=", "3+4=", "upper:hello=",
                               "upper:abcdefghijklmnopqrstuvwxyzabcdefghijkl=",
                               "upper:" + "thequickbrownfoxjumpsoverthelazydog" * 2 + "=", "hi",
                               "upper:the quick brown fox=")
    return load_pair("miniature", MINIATURE, prompts, block=32, max_tokens=64, speculative_max_tokens=64)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Random weights in the published layout, large enough for peaked logits (the head scaled up so confidences
    spread over (0, 1) and a threshold commits several tokens in some passes); the mask id's head row is zero, so
    its logit (0) is never near the best (our candidates exclude the mask id, the reference's do not: README).
    Requests use blocks of 8, which keeps the real vocabulary cheap; `speculative`, whose drafts are never
    accepted on random weights (two passes a token), decodes 8 tokens, the other modes 24 (three blocks)."""
    checkpoint = tmp_path_factory.mktemp("reference_parity") / "checkpoint"
    config = real_scale_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig.from_dict(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.3)
        model.diffusion_head.weight.mul_(4.0)
        model.diffusion_head.weight[config["mask_token_id"]] = 0.0
    save_checkpoint(model, checkpoint, dtype="bfloat16", max_shard_bytes=16 << 20)
    rank, inner, layers = 128, config["num_attention_heads"] * config["head_dim"], config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(1)
    lora_a = [torch.randn(rank, inner, generator=generator) * 0.02 for _ in range(layers)]
    lora_b = [torch.randn(config["hidden_size"], rank, generator=generator) * 0.02 for _ in range(layers)]
    save_adapter(checkpoint / ADAPTER_DIR, lora_a, lora_b, rank, 512.0)
    prompts = [[1, 500, 7000, 9], [1, 20000, 3], [1, 77, 88, 99, 131000, 42, 1234]]
    return load_pair("random", checkpoint, prompts, block=8, max_tokens=24, speculative_max_tokens=8)


@pytest.fixture(params=["miniature_pair", "random_pair"])
def pair(request: pytest.FixtureRequest) -> Pair:
    return request.getfixturevalue(request.param)


def test_the_reference_passes(miniature_pair: Pair) -> None:
    """The reference's own footing, on transformers alone: a bidirectional pass over a block after a causal
    prefill equals one forward over prompt + block under the block-causal mask, and leaves the cache as it was;
    the draft LoRA changes a drafting pass and nothing after it."""
    r = miniature_pair.reference
    prompt, block = torch.tensor([miniature_pair.prompts[4]]), torch.tensor([[9, 4, 4, 30, 4, 4]])
    n, t = prompt.shape[1], block.shape[1]
    i = torch.arange(n + t)
    allowed = (i[None, :] <= i[:, None]) | ((i[:, None] >= n) & (i[None, :] >= n))
    with torch.no_grad(), ref.bidirectional(r, draft=False):
        whole = r.model(input_ids=torch.cat([prompt, block], dim=1), attention_mask=allowed[None, None]).logits
    cache = ref.new_cache(r)
    ref.causal_pass(r, prompt, cache)
    plain = ref.bidirectional_pass(r, block, cache)
    assert cache.get_seq_length() == n
    torch.testing.assert_close(plain, whole[:, n:], atol=1e-4, rtol=1e-4)
    drafted = ref.bidirectional_pass(r, block, cache, draft=True)
    assert not torch.allclose(drafted, plain, atol=1e-2)
    torch.testing.assert_close(ref.bidirectional_pass(r, block, cache), plain, atol=0, rtol=0)


def test_ar(pair: Pair) -> None:
    got = pair.ours(GenerationParams("ar", pair.max_tokens))
    want = pair.each_prompt(lambda x: pair.ar(x, pair.max_tokens))
    pair.assert_same(got, want, pair.max_tokens)


@pytest.mark.parametrize("threshold", [0.9, 0.5])
def test_diffusion_with_a_threshold(pair: Pair, threshold: float) -> None:
    got = pair.ours(GenerationParams("diffusion", pair.max_tokens, block_length=pair.block, threshold=threshold))
    want = pair.each_prompt(lambda x: pair.diffusion(x, pair.max_tokens, pair.block, threshold))
    pair.assert_same(got, want, pair.max_tokens)


def test_diffusion_with_fixed_steps(pair: Pair) -> None:
    """The reference commits `masked // L` positions per pass (the remainder one each in the first): one per pass
    over the L - 1 masks, which is ours at `steps` = L. Where several confidences are equal in fp32 (saturated at
    1.0 on the trained miniature, typically the end tokens after an answer) the two may commit a different one of
    them first (README): the tokens agree; the passes agree wherever a row decodes to `max_tokens`."""
    params = GenerationParams("diffusion", pair.max_tokens, block_length=pair.block, threshold=None, steps=pair.block)
    got = pair.ours(params)
    want = pair.each_prompt(lambda x: pair.diffusion(x, pair.max_tokens, pair.block))
    pair.assert_same(got, want, pair.max_tokens, forwards=False)
    for g, w in zip(got, want):
        if g.finish_reason == "length":
            assert g.num_forwards == w.nfe


def test_diffusion_with_fewer_steps_than_the_block(random_pair: Pair) -> None:
    """`steps` below the block length: ours spreads the masks as the reference's schedule does with `steps` in
    place of L (`masked // steps` per pass, the remainder one each in the first passes)."""
    p = random_pair
    got = p.ours(GenerationParams("diffusion", p.max_tokens, block_length=p.block, threshold=None, steps=3))
    want = p.each_prompt(lambda x: p.diffusion(x, p.max_tokens, p.block, steps=3))
    p.assert_same(got, want, p.max_tokens)


def test_speculative_without_the_draft_adapter(pair: Pair) -> None:
    """The base weights draft: no look-ahead row, so every cycle is the reference's (draft, verify)."""
    max_tokens = pair.speculative_max_tokens
    got = pair.ours(GenerationParams("speculative", max_tokens, block_length=pair.block, draft_adapter=False))
    want = pair.each_prompt(lambda x: pair.speculative(x, max_tokens, pair.block, draft_lora=False))
    pair.assert_same(got, want, max_tokens)
    assert [g.verify_passes for g in got] == [w.cycles for w in want]


def test_speculative_with_the_draft_adapter(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter drafts; with our look-ahead row off, every cycle is the reference's, pass for pass."""
    max_tokens = pair.speculative_max_tokens
    monkeypatch.setattr(refine, "look_ahead_for", lambda params, runtime: False)
    got = pair.ours(GenerationParams("speculative", max_tokens, block_length=pair.block))
    want = pair.each_prompt(lambda x: pair.speculative(x, max_tokens, pair.block))
    pair.assert_same(got, want, max_tokens)
    assert [g.verify_passes for g in got] == [w.cycles for w in want]
    if pair.name == "miniature":  # the random model's drafts are never accepted; the miniature's adapter matters
        base = pair.each_prompt(lambda x: pair.speculative(x, max_tokens, pair.block, draft_lora=False))
        assert [w.cycles for w in want] != [b.cycles for b in base]


def test_speculative_with_the_look_ahead_row_keeps_the_tokens(miniature_pair: Pair) -> None:
    """As served (adapter and look-ahead row on): the same tokens as the reference, in no more passes here."""
    p = miniature_pair
    got = p.ours(GenerationParams("speculative", p.max_tokens))
    want = p.each_prompt(lambda x: p.speculative(x, p.max_tokens, p.block))
    p.assert_same(got, want, p.max_tokens, forwards=False)
    assert all(g.num_forwards <= w.nfe for g, w in zip(got, want))
    assert sum(g.num_forwards for g in got) < sum(w.nfe for w in want)  # the look-ahead saved drafting passes


# --- deliberate differences: the part that must agree ---------------------------------------------------------

def test_rows_end_on_their_own_where_the_reference_ends_the_batch(miniature_pair: Pair) -> None:
    """Two prompts of one length, one answer ending inside the block and one not: the reference (batch-wide) keeps
    denoising and decoding the finished row and cuts no row; ours finishes that row at its end token. Each row's
    tokens up to its first end token agree."""
    p = miniature_pair
    prompts = miniature_tokens("upper:ab=", "123+4567=")  # AB<end> / 4690 (no end in 4 tokens)
    block = max_tokens = 4
    x = torch.tensor(prompts)
    cases = [(GenerationParams("ar", max_tokens), p.ar(x, max_tokens)),
             (GenerationParams("diffusion", max_tokens, block_length=block, threshold=0.9),
              p.diffusion(x, max_tokens, block, threshold=0.9))]
    for params, want in cases:
        got = p.ours(params, prompts)
        assert [g.finish_reason for g in got] == ["eos", "length"]
        assert len(want.tokens[0]) == max_tokens and not set(want.tokens[1]) & p.eos  # no row was cut
        for g, w in zip(got, want.tokens):
            assert (g.tokens, g.finish_reason) == as_ours(w, p.eos, max_tokens), params.mode


def test_max_tokens_not_a_multiple_of_the_block(miniature_pair: Pair) -> None:
    """The reference decodes whole blocks only. Ours stops at `max_tokens`: its last block is cut there (positions
    after it stay masked and are never predicted), so every block before it is the reference's at the next
    multiple of the block, and that block's seed too."""
    p = miniature_pair
    prompt = p.prompts[4]  # a 38-token answer: no end token before 40
    block, max_tokens = 8, 20
    got = p.ours(GenerationParams("diffusion", max_tokens, block_length=block, threshold=0.9), [prompt])[0]
    want = p.diffusion(torch.tensor([prompt]), 24, block, threshold=0.9)
    assert len(got.tokens) == max_tokens and got.finish_reason == "length"
    whole = max_tokens // block * block + 1  # the whole blocks and the seed of the cut one
    assert got.tokens[:whole] == want.tokens[0][:whole]


def test_a_prompt_prefilled_in_chunks(miniature_pair: Pair) -> None:
    """With an artifact's pass limits (as Triton plans passes), a prompt longer than the prefill chunk is prefilled
    in several causal passes, each a forward of its own: the same tokens, one more forward per extra chunk."""
    from dlm.planner import PassLimits

    p = miniature_pair
    limits = PassLimits(max_batch=4, max_tokens=32, max_context=256, max_block=32, token_budget=128, prefill_chunk=16)
    got = generate(p.runtime, p.prompts, GenerationParams("diffusion", p.max_tokens, threshold=0.9), p.spec, limits)
    want = p.each_prompt(lambda x: p.diffusion(x, p.max_tokens, p.block, threshold=0.9))
    p.assert_same(got, want, p.max_tokens, forwards=False)
    chunks = [-(-len(prompt) // limits.chunk) for prompt in p.prompts]
    assert max(chunks) > 1
    assert [g.num_forwards for g in got] == [w.nfe + c - 1 for w, c in zip(want, chunks)]


def test_speculative_stops_at_max_tokens_where_the_reference_overruns(miniature_pair: Pair) -> None:
    """The reference's last cycle may emit up to L - 1 tokens past `max_new_tokens`; ours commits up to
    `max_tokens` and stops, after the same passes."""
    p = miniature_pair
    prompt, max_tokens = p.prompts[4], 10
    got = p.ours(GenerationParams("speculative", max_tokens, draft_adapter=False), [prompt])[0]
    want = p.speculative(torch.tensor([prompt]), max_tokens, p.block, draft_lora=False)
    assert len(want.tokens[0]) > max_tokens  # the reference over-ran
    assert got.tokens == want.tokens[0][:max_tokens] and got.num_forwards == want.nfe
