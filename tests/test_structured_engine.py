"""Engine contract version 3 (DESIGN §4a): `token_bitmask [B, N, ceil(V/32)]` applied in the graph before the top-K
and the log-sum-exp. The bits unpacked with integer ops; a mask that allows a few tokens gives exactly those as
candidates with the log-sum-exp over them (PyTorch module, ONNX Runtime and torch.export artifacts of a tiny
random checkpoint, and a random checkpoint of the real vocabulary); unconstrained rows all-allowed by default;
version-2 artifacts serve unconstrained passes and refuse constrained ones with the rebuild command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_tiny_model
from dlm.contract import EngineContract, OldContract
from dlm.runtime import CacheLayout, OnnxRuntime, TorchExportRuntime, TorchRuntime, Unconstrained
from export.__main__ import main
from export.checkpoint import save_checkpoint
from export.model import EXCLUDED_LOGIT, unpack_bitmask


def pack(allowed: np.ndarray) -> np.ndarray:
    """[..., V] bool → [..., ceil(V/32)] int32 in llguidance's layout (bit j of word w: token 32·w + j)."""
    v = allowed.shape[-1]
    padded = np.zeros((*allowed.shape[:-1], -(-v // 32) * 32), dtype=bool)
    padded[..., :v] = allowed
    bits = padded.reshape(*allowed.shape[:-1], -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return bits.sum(axis=-1).astype(np.uint32).view(np.int32)


def test_the_bits_unpack_exactly_with_the_sign_bit():
    rng = np.random.default_rng(0)
    allowed = rng.random((2, 3, 200)) < 0.4
    allowed[0, 0, [31, 63, 95, 127]] = True  # sign bits of four words
    allowed[1, 2] = True  # every bit: the word -1
    words = pack(allowed)
    assert (words < 0).any() and (words[1, 2, :6] == -1).all()
    assert (unpack_bitmask(torch.from_numpy(words), 200).numpy() == allowed).all()


def one_pass(runtime, mask=None, rows=(0,), prompt=(1, 5, 6, 7, 8)):
    """A causal pass over `prompt` in two rows predicting every position, with `mask [N, W]` on `rows`."""
    runtime.allocate(2, 32)
    t = len(prompt)
    ids = np.tile(np.array(prompt, dtype=np.int64), (2, 1))
    masks = None if mask is None else (np.array(rows, dtype=np.int64),
                                       np.stack([mask] * len(rows)) if rows else mask[None, :0])
    return runtime.forward(np.array([0, 1]), ids, np.tile(np.arange(t), (2, 1)), np.ones((2, t), dtype=np.int64),
                           np.zeros(2, dtype=np.int64), np.array([True, True]), np.tile(np.arange(t), (2, 1)),
                           token_bitmask=masks)


def full_logits(model, prompt=(1, 5, 6, 7, 8)) -> torch.Tensor:
    ids = torch.tensor([list(prompt)])
    t = ids.shape[1]
    with torch.no_grad():
        logits, _ = model.full_logits(ids, torch.arange(t)[None], torch.ones(1, t, dtype=torch.long),
                                      model.empty_cache(1), torch.tensor(True))
    return logits[0].double()


def check_constrained(candidates, allowed: np.ndarray, logits: torch.Tensor, tol: float) -> None:
    """Row 0: the candidates above the excluded level are exactly the allowed tokens, best first, and the
    log-sum-exp is over them; row 1 (unconstrained): the plain top-K and log-sum-exp (the mask id excluded)."""
    n = allowed.shape[0]
    for m in range(n):
        ids = set(np.flatnonzero(allowed[m]).tolist())
        real = candidates.logits[0, m] > EXCLUDED_LOGIT / 2
        assert set(candidates.tokens[0, m][real].tolist()) == ids
        want = torch.logsumexp(logits[m, sorted(ids)], dim=0).item()
        assert abs(float(candidates.logsumexp[0, m]) - want) < tol
        np.testing.assert_allclose(candidates.logits[0, m][real], logits[m, candidates.tokens[0, m][real]].numpy(),
                                   atol=tol)
    free = logits.clone()
    free[:, 100] = float("-inf")  # the tiny config's mask id
    np.testing.assert_allclose(candidates.logsumexp[1], torch.logsumexp(free, dim=-1).numpy(), atol=tol)


def few_allowed(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    allowed = np.zeros((n, vocab), dtype=bool)
    for m in range(n):
        allowed[m, rng.choice([t for t in range(vocab) if t != 100], 3, replace=False)] = True
    return allowed


def test_a_mask_that_allows_a_few_tokens_gives_exactly_those(tiny_config_dict):
    model = random_tiny_model()
    runtime = TorchRuntime(model, CacheLayout.from_config(tiny_config_dict))
    allowed = few_allowed(128, 5)
    got = one_pass(runtime, pack(allowed))
    check_constrained(got, allowed, full_logits(model), 1e-4)
    # no constrained row: the same candidates as the plain graph
    plain, masked_free = one_pass(runtime), one_pass(runtime, pack(allowed), rows=())
    np.testing.assert_array_equal(plain.tokens, masked_free.tokens)


def test_a_real_vocabulary_random_model_takes_the_mask():
    """The real vocabulary (131,072 ids, 4,096 words per position) on a random model of small width."""
    from export.config import ModelConfig
    from export.model import DiffusionLM
    from export.random_checkpoint import real_scale_config

    config = real_scale_config(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig.from_dict(config)).float().eval()
    vocab = config["vocab_size"]
    assert vocab == 131072
    runtime = TorchRuntime(model, CacheLayout.from_config(config))
    assert runtime.bitmask_words == 4096
    rng = np.random.default_rng(1)
    allowed = np.zeros((5, vocab), dtype=bool)
    for m in range(5):
        allowed[m, rng.choice(vocab - 1000, 4, replace=False) + 500] = True
    allowed[:, vocab - 1] = True  # the last word's sign bit
    mask_id = int(config["mask_token_id"])
    allowed[:, mask_id] = False
    got = one_pass(runtime, pack(allowed))
    logits = full_logits(model)
    for m in range(5):
        real = got.logits[0, m] > EXCLUDED_LOGIT / 2
        assert set(got.tokens[0, m][real].tolist()) == set(np.flatnonzero(allowed[m]).tolist())
        want = torch.logsumexp(logits[m, np.flatnonzero(allowed[m])], dim=0).item()
        assert abs(float(got.logsumexp[0, m]) - want) < 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random checkpoint exported with --structured (ONNX and torch.export), and without (version 2)."""
    root = tmp_path_factory.mktemp("structured")
    checkpoint = root / "checkpoint"
    save_checkpoint(random_tiny_model(), checkpoint, dtype="float32")
    limits = ["--max-batch", "2", "--max-context", "32", "--max-tokens", "16"]
    assert main(["onnx", "--checkpoint", str(checkpoint), "--out", str(root / "v3"), "--structured",
                 "--torch-export", *limits]) == 0
    assert main(["onnx", "--checkpoint", str(checkpoint), "--out", str(root / "v2"), *limits]) == 0
    return root


@pytest.mark.slow
def test_structured_artifacts_apply_the_mask_and_record_version_3(exported, tiny_config_dict):
    entry = json.loads((exported / "v3" / "manifest.json").read_text())["artifacts"]["model.onnx"]
    assert entry["contract"]["version"] == 3 and entry["contract"]["structured"] is True
    assert "--structured" in entry["command"]
    contract = EngineContract.from_dict(entry["contract"])
    assert contract.input_names[-1] == "token_bitmask" and contract.bitmask_words == 4
    allowed = few_allowed(128, 5, seed=3)
    model = random_tiny_model()
    for runtime in (OnnxRuntime(exported / "v3", threads=1), TorchExportRuntime(exported / "v3")):
        assert runtime.structured
        check_constrained(one_pass(runtime, pack(allowed)), allowed, full_logits(model), 1e-3)
        again = one_pass(runtime)  # the constrained rows' masks do not outlive their pass
        np.testing.assert_allclose(again.logsumexp[0], again.logsumexp[1], atol=1e-5)


@pytest.mark.slow
def test_a_version_2_artifact_serves_unconstrained_passes_and_refuses_constrained_ones(exported):
    runtime = OnnxRuntime(exported / "v2", threads=1)
    assert not runtime.structured
    plain = one_pass(runtime)
    structured = one_pass(OnnxRuntime(exported / "v3", threads=1))
    np.testing.assert_array_equal(plain.tokens, structured.tokens)  # all-allowed by default: the same candidates
    with pytest.raises(Unconstrained, match=r"contract version 2.*--structured"):
        one_pass(runtime, pack(few_allowed(128, 5)))
    one_pass(runtime, pack(few_allowed(128, 5)), rows=())  # no constrained row: served


def test_versions_2_and_3_are_served_and_1_refused():
    from dlm.contract import Profile

    contract = EngineContract.from_config({"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 8,
                                           "vocab_size": 100}, "float32", Profile.from_limits(8, 2, 32),
                                          structured=True)
    data = contract.to_dict()
    assert data["version"] == 3 and EngineContract.from_dict(data) == contract
    assert contract.bitmask_words == 4 and contract.inputs[-1].dims[-1] == 4
    v2 = {**data, "version": 2, "structured": False}
    assert not EngineContract.from_dict(v2).structured
    with pytest.raises(OldContract):
        EngineContract.from_dict({**data, "version": 1})


def test_the_repository_rebuilds_a_version_2_artifact_when_asked_for_a_structured_one():
    """`python -m export repository --structured` does not reuse the shipped (version 2) artifact."""
    from conftest import MINIATURE, ROOT
    from export.repository import reusable_artifact

    engine = ROOT / "model_repository" / "dlm" / "1" / "engine"
    entry = json.loads((engine / "manifest.json").read_text())["artifacts"]["model.onnx"]
    batch, context = entry["contract"]["profile"]["batch"][2], entry["contract"]["profile"]["past_plus_tokens"][2]
    assert reusable_artifact(engine, MINIATURE, entry["precision"], batch, context, "auto")
    assert not reusable_artifact(engine, MINIATURE, entry["precision"], batch, context, "auto", structured=True)
