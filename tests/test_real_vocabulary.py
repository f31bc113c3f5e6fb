"""A checkpoint at the real family's vocabulary (131,072), head size (128) and KV heads (8), one layer, random
weights: written at run time, exported with the command users run, and served in every mode by a real tritonserver.
The miniature's 128-token vocabulary hides whatever scales with the vocabulary; this does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.__main__ import main
from export.random_checkpoint import REAL_VOCAB, real_scale_config, write_random_checkpoint
from triton_server import grpc_generate, repository_with, start_server

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_vocabulary")
    checkpoint, artifact = root / "checkpoint", root / "onnx"
    write_random_checkpoint(checkpoint, real_scale_config(num_hidden_layers=1, hidden_size=256, intermediate_size=512))
    assert main(["onnx", "--checkpoint", str(checkpoint), "--out", str(artifact), "--max-batch", "4",
                 "--max-context", "256"]) == 0
    return root, checkpoint, artifact


@pytest.fixture(scope="module")
def server(exported):
    root, checkpoint, artifact = exported
    repository = repository_with(root / "repository", artifact=str(artifact), tokenizer=str(checkpoint),
                                 max_live="4", max_tokens=str(MAX_TOKENS))
    server = start_server(root / "server.log", repository=repository)
    yield server
    server.stop()


def test_the_artifact_never_returns_the_vocabulary(exported):
    _, _, artifact = exported
    entry = json.loads((artifact / "manifest.json").read_text())["artifacts"]["model.onnx"]
    contract = entry["contract"]
    assert contract["vocab_size"] == REAL_VOCAB and contract["head_dim"] == 128 and contract["num_kv_heads"] == 8
    from dlm.contract import EngineContract

    returned = EngineContract.from_dict(contract).output_bytes(batch=16, tokens=32, past=0, positions=32)
    candidates = returned["top_tokens"] + returned["top_logits"] + returned["logsumexp"]
    assert candidates < 1_000_000  # the target at 16 × 32; contract v1 returned 268 MB here


@pytest.mark.parametrize("mode", ["ar", "diffusion", "speculative"])
def test_every_mode_decodes_through_the_server(server, mode):
    responses = grpc_generate(server.grpc_url, "héllo wörld, 1+1=", mode=mode, return_log_probs=True,
                              top_logprobs=3)
    final = responses[-1]
    assert final["finish_reason"] in ("length", "stop")
    assert 1 <= final["num_tokens"] <= MAX_TOKENS and final["num_forwards"] >= 2
    log_probs = np.concatenate([r["output_log_probs"] for r in responses if "output_log_probs" in r])
    assert len(log_probs) >= 1 and (log_probs <= 0).all() and (log_probs > -np.log(REAL_VOCAB) - 5).all()
    top = np.concatenate([r["output_top_log_probs"] for r in responses if "output_top_log_probs" in r])
    assert top.shape == (len(log_probs), 3) and (np.diff(top, axis=1) <= 0).all()


def test_speculative_equals_ar_at_the_real_vocabulary(server):
    ar = grpc_generate(server.grpc_url, "the quick brown fox", mode="ar")[-1]
    speculative = grpc_generate(server.grpc_url, "the quick brown fox", mode="speculative")[-1]
    assert speculative["text"] == ar["text"] and speculative["num_tokens"] == ar["num_tokens"]


def test_sampling_controls_at_the_real_vocabulary(server):
    def sample(**values):
        return grpc_generate(server.grpc_url, "once upon a time", mode="diffusion", temperature=1.0, **values)[-1]

    assert sample(seed=3, top_k=8, top_p=0.9)["text"] == sample(seed=3, top_k=8, top_p=0.9)["text"]
    greedy = grpc_generate(server.grpc_url, "once upon a time", mode="diffusion")[-1]["text"]
    assert sample(seed=4, top_k=1)["text"] == greedy
