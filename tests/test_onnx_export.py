"""`python -m export onnx` on a random tiny checkpoint: the graph is DESIGN §4's, runs at the profile's corners,
agrees with PyTorch, and leaves a replayable polygraphy comparison and a manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_CONFIG, random_tiny_model, replay_polygraphy
from dlm.contract import EngineContract, Profile
from export.__main__ import main
from export.checkpoint import load_checkpoint, save_checkpoint
from export.manifest import checkpoint_sha256
from export.onnx_export import ExportError, graph_signature, validate
from export.torch_export import sample_inputs

MAX_BATCH, MAX_CONTEXT, MAX_TOKENS = 3, 40, 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random checkpoint and what the command line exports from it (once for the module)."""
    model = random_tiny_model()
    root = tmp_path_factory.mktemp("onnx")
    checkpoint, out = root / "checkpoint", root / "artifact"
    save_checkpoint(model, checkpoint, dtype="float32")
    rc = main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--max-batch", str(MAX_BATCH),
               "--max-context", str(MAX_CONTEXT), "--max-tokens", str(MAX_TOKENS)])
    assert rc == 0
    entry = json.loads((out / "manifest.json").read_text())["artifacts"]["model.onnx"]
    return checkpoint, out, entry


def test_inputs_outputs_dtypes_and_axes_are_the_engine_contract(exported):
    _, out, _ = exported
    c = TINY_CONFIG
    layers, kv, d, vocab = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    i64, f32, boolean = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    k = 64  # the default --top-k
    # DESIGN §4, written out: names in order, dtypes, and the dynamic axes B, T, P, P+T and N; no output of the
    # vocabulary's size
    assert graph_signature(out / "model.onnx") == {
        "input_ids": (i64, ("batch", "tokens")),
        "position_ids": (i64, ("batch", "tokens")),
        "attention_mask": (i64, ("batch", "past_plus_tokens")),
        "past_key_values": (f32, ("batch", layers, 2, kv, "past", d)),
        "causal": (boolean, ("batch",)),
        "logit_positions": (i64, ("batch", "positions")),
        "top_tokens": (i64, ("batch", "positions", k)),
        "top_logits": (f32, ("batch", "positions", k)),
        "logsumexp": (f32, ("batch", "positions")),
        "present_key_values": (f32, ("batch", layers, 2, kv, "tokens", d)),
    }
    assert vocab not in {dim for _, dims in graph_signature(out / "model.onnx").values() for dim in dims}
    model = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    onnx.checker.check_model(model, full_check=True)


def test_manifest_records_what_the_graph_was_built_from_and_for(exported):
    checkpoint, out, entry = exported
    assert entry["kind"] == "onnx" and entry["precision"] == "fp32" and entry["opset"] == 18
    assert entry["checkpoint_sha256"] == checkpoint_sha256(checkpoint)
    assert entry["config"] == json.loads((checkpoint / "config.json").read_text())
    assert set(entry["files"]) == {"model.onnx"}
    profile = Profile.from_dict(entry["contract"]["profile"])
    block = TINY_CONFIG["block_size"]
    assert profile.batch == (1, 1, MAX_BATCH)
    assert profile.tokens == (1, block, MAX_TOKENS)
    assert profile.past == (0, MAX_CONTEXT // 2, MAX_CONTEXT - 1)
    assert profile.past_plus_tokens == (1, MAX_CONTEXT // 2 + block, MAX_CONTEXT)
    assert profile.positions == (1, block, 2 * block)
    assert entry["contract"]["top_k"] == 64 and entry["contract"]["version"] == 2
    assert "--max-block 16 --top-k 64" in entry["command"]
    assert entry["command"].startswith(f"python -m export onnx --checkpoint {checkpoint} --out {out}")


@pytest.fixture(scope="module")
def session(exported):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(exported[1] / "model.onnx"), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("corner", ["min", "opt", "max-tokens", "max-cache"])
def test_profile_corners_run_in_onnxruntime_and_match_pytorch(exported, session, corner):
    checkpoint, _, entry = exported
    contract = EngineContract.from_dict(entry["contract"])
    p = contract.profile
    batch, tokens, past, positions = {
        "min": (p.batch[0], p.tokens[0], p.past[0], p.positions[0]),
        "opt": (p.batch[1], p.tokens[1], p.past[1], p.positions[1]),
        "max-tokens": (p.batch[2], p.tokens[2], p.past_plus_tokens[2] - p.tokens[2], p.positions[2]),
        "max-cache": (p.batch[2], p.tokens[0], p.past[2], p.positions[0]),
    }[corner]
    p.check(batch, tokens, past, positions)  # each corner is inside the profile
    feed = sample_inputs(contract, batch, tokens, past, positions=positions)
    tokens_out, logits, lse, present = session.run(None, feed)
    k = contract.top_k
    assert tokens_out.shape == logits.shape == (batch, positions, k) and lse.shape == (batch, positions)
    assert tokens_out.dtype == np.int64 and logits.dtype == lse.dtype == np.float32
    assert present.shape == (batch, contract.num_layers, 2, contract.num_kv_heads, tokens, contract.head_dim)
    with torch.no_grad():
        want = load_checkpoint(checkpoint, "float32")(*(torch.from_numpy(feed[n]) for n in feed))
    want_tokens, want_logits, want_lse, want_present = (w.numpy() for w in want)
    np.testing.assert_array_equal(tokens_out[..., 0], want_tokens[..., 0])
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=1e-4)
    np.testing.assert_allclose(present, want_present, atol=1e-4)


def test_validation_covers_an_empty_cache_and_stays_within_tolerance(exported):
    _, _, entry = exported
    report = entry["validation"]
    assert any(s["past"] == 0 for s in report["shapes"]) and any(s["past"] > 0 for s in report["shapes"])
    assert report["max_abs_logit_diff"] < 1e-4 <= report["tolerance"]
    assert all(s["argmax_agreement"] == 1.0 for s in report["shapes"])


def test_validation_refuses_a_graph_that_disagrees_with_pytorch(exported):
    checkpoint, out, entry = exported
    other = load_checkpoint(checkpoint, "float32")
    with torch.no_grad():
        other.diffusion_head.weight.mul_(1.5)
    with pytest.raises(ExportError, match="ONNX Runtime differs from PyTorch by .* more than the tolerance"):
        validate(other, out / "model.onnx", EngineContract.from_dict(entry["contract"]), 1e-3, log=lambda _: None)


def test_saved_polygraphy_comparison_replays(exported):
    """The saved inputs and ONNX Runtime outputs load into `polygraphy run`, as the GPU host replays them
    against a TensorRT plan."""
    _, out, entry = exported
    assert entry["polygraphy"] == {"inputs": "polygraphy_inputs.json", "outputs": "polygraphy_outputs.json"}
    result = replay_polygraphy(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASSED" in result.stdout
