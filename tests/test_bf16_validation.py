"""The bf16 validation (`export.bf16_validation`) on the shipped miniature: it decodes realistic prompts with the
serving loop, the trained weights pass it, and a planted numerical fault in the bf16 model (RoPE's frequencies in
bf16) is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import MINIATURE
from dlm.contract import EngineContract
from export.bf16_validation import AGREEMENT, validate_bf16, validation_prompts, text_encoder
from export.model import DiffusionLM
from export.onnx_export import TOLERANCE, ExportError
from export.torch_export import contract_for, load_for_export, profile_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference() -> DiffusionLM:
    return load_for_export(MINIATURE, "fp32")


@pytest.fixture(scope="module")
def contract(reference: DiffusionLM) -> EngineContract:
    return contract_for(reference, "bf16", profile_for(reference.config))  # the command's default profile


def test_prompts_are_tokenized_text_and_two_fill_the_context(reference: DiffusionLM) -> None:
    config = reference.config.to_dict()
    encode = text_encoder(MINIATURE, config, log=print)
    prompts = validation_prompts(encode, longest=900)
    assert all(p[0] == config["bos_token_id"] for p in prompts)  # the tokenizer's own BOS: encoded from text
    assert all(len(p) < 50 for p in prompts[:-2])  # single held-out problems
    assert all(780 < len(p) <= 900 for p in prompts[-2:])  # few-shot: solved problems, one per line, then one


def test_the_trained_miniature_passes(reference: DiffusionLM, contract: EngineContract) -> None:
    lines: list[str] = []
    report = validate_bf16(load_for_export(MINIATURE, "bf16"), reference, contract, MINIATURE, TOLERANCE["bf16"],
                           log=lines.append)
    assert report["confident_agreement"] >= AGREEMENT and report["confident_positions"] > 500
    assert report["mean_confidence_error"] <= TOLERANCE["bf16"] / 2  # with room: bf16 rounding alone
    assert report["causal"]["positions"] and report["bidirectional"]["positions"]  # prefill/block writing, denoising
    assert report["longest_context"] > 900
    assert "same best candidate at 100.00%" in lines[-1]


def test_a_planted_rope_fault_is_caught(
    reference: DiffusionLM, contract: EngineContract, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the override of `DiffusionLM._apply` that keeps RoPE's inverse frequencies in fp32, casting the
    model to bf16 rounds them to 8 significant bits: angles off by ~0.2 % of pos · freq, radians at far positions."""
    monkeypatch.setattr(DiffusionLM, "_apply", nn.Module._apply)
    faulty = load_for_export(MINIATURE, "bf16").to(torch.bfloat16)
    assert faulty.inv_freq.dtype == torch.bfloat16
    lines: list[str] = []
    with pytest.raises(ExportError, match="picks another best candidate than fp32 at .* where fp32 is confident"):
        validate_bf16(faulty, reference, contract, MINIATURE, TOLERANCE["bf16"], log=lines.append)
    print("\n".join(lines))
