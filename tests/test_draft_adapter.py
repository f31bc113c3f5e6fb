"""The draft-only LoRA in the graph: one graph takes `draft [B]` and applies the LoRA to those rows only, in PyTorch,
`torch.export` and ONNX Runtime alike; the loop sets it for speculative drafting passes only, so `speculative` stays
equal to `ar`; the manifest records the adapter; a graph without an adapter is unchanged; a bad adapter is refused at
export, naming the file and the tensor."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import random_tiny_model
from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime, load_runtime
from export.__main__ import main
from export.adapter import ADAPTER_DIR, load_adapter, save_adapter
from export.checkpoint import load_checkpoint, save_checkpoint
from export.config import ModelConfig
from export.torch_export import sample_inputs, to_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 40, 41]]
RANK, ALPHA = 4, 16.0


def write_random_adapter(checkpoint, config: ModelConfig, scale: float = 0.3, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    inner = config.num_attention_heads * config.head_dim
    a = [torch.randn(RANK, inner, generator=generator) * scale for _ in range(config.num_hidden_layers)]
    b = [torch.randn(config.hidden_size, RANK, generator=generator) * scale for _ in range(config.num_hidden_layers)]
    save_adapter(checkpoint / ADAPTER_DIR, a, b, RANK, ALPHA)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with a random draft adapter beside it."""
    directory = tmp_path_factory.mktemp("adapter") / "checkpoint"
    model = random_tiny_model()
    save_checkpoint(model, directory, dtype="float32")
    write_random_adapter(directory, model.config)
    return directory


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter_artifact")
    assert main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--max-batch", "4",
                 "--max-context", "64", "--torch-export"]) == 0
    return out


@pytest.fixture(scope="module")
def config(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def spec(config):
    return dataclasses.replace(TokenSpec.from_config(config), eos_token_ids=frozenset())


def artifact_runtime(name: str, built, config):
    return load_runtime(name, built, config, threads=1) if name == "onnxruntime" else load_runtime(name, built, config)


def eager(checkpoint, with_adapter: bool = True):
    model = load_checkpoint(checkpoint, "float32")
    if with_adapter:
        model.attach_draft_adapter(load_adapter(checkpoint / ADAPTER_DIR, model.config))
    return model


def test_the_switch_applies_the_lora_to_draft_rows_only(checkpoint):
    """Row by row: a draft row equals o_proj with `W + scale · B A` merged, any other row the base model."""
    model, base = eager(checkpoint), eager(checkpoint, with_adapter=False)
    merged = eager(checkpoint, with_adapter=False)
    adapter = model.draft_adapter
    with torch.no_grad():
        for layer, a, b in zip(merged.encoder.layers, adapter.lora_a, adapter.lora_b):
            layer.self_attn.o_proj.weight += adapter.scale * b @ a
    from dlm.contract import EngineContract, Profile

    contract = EngineContract.from_config(model.config.to_dict(), "float32", Profile.from_limits(8, 4, 64),
                                          draft_adapter=True)
    feed = sample_inputs(contract, 4, 8, 5, seed=3)
    feed["draft"] = np.array([True, False, True, False])
    args = [to_torch(feed[name]) for name in contract.input_names]
    with torch.no_grad():
        _, got, got_lse, _ = model(*args)
        _, want_base, base_lse, _ = base(*args[:-1])
        _, want_merged, merged_lse, _ = merged(*args[:-1])
    for row, drafting in enumerate(feed["draft"]):
        want = want_merged if drafting else want_base
        torch.testing.assert_close(got[row], want[row], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(want_merged[0], want_base[0], atol=1e-2)  # the adapter does change a draft row


def test_the_graph_takes_draft_and_the_manifest_records_the_adapter(built, checkpoint):
    manifest = json.loads((built / "manifest.json").read_text())
    adapter = load_adapter(checkpoint / ADAPTER_DIR, ModelConfig.from_file(checkpoint))
    for name in ("model.onnx", "model.pt2"):
        entry = manifest["artifacts"][name]
        assert entry["contract"]["draft_adapter"] is True
        assert entry["draft_adapter"]["sha256"] == adapter.sha256
        assert entry["draft_adapter"]["rank"] == RANK and entry["draft_adapter"]["alpha"] == ALPHA
        assert "--draft-adapter" in entry["command"]
    import onnx

    inputs = [i.name for i in onnx.load(str(built / "model.onnx"), load_external_data=False).graph.input]
    assert inputs[-1] == "draft"


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "torch"])
def test_artifact_runtimes_match_pytorch_on_mixed_draft_rows(built, checkpoint, config, runtime_name):
    runtime = artifact_runtime(runtime_name, built, config)
    reference = TorchRuntime(eager(checkpoint), CacheLayout.from_config(config))
    for r in (runtime, reference):
        r.allocate(4, 64)
    b, t = 4, 6
    rng = np.random.default_rng(0)
    args = (np.arange(b), rng.integers(5, 100, (b, t)), np.tile(np.arange(t), (b, 1)), np.ones((b, t), np.int64),
            np.zeros(b, np.int64), np.array([True, False, False, True]), np.tile(np.arange(t), (b, 1)),
            np.array([False, True, False, True]))
    got, want = runtime.forward(*args), reference.forward(*args)
    np.testing.assert_array_equal(got.tokens[..., 0], want.tokens[..., 0])
    np.testing.assert_allclose(got.logsumexp, want.logsumexp, atol=1e-3)


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "torch"])
def test_speculative_with_the_adapter_equals_ar(built, config, spec, runtime_name):
    runtime = artifact_runtime(runtime_name, built, config)
    ar = generate(runtime, PROMPTS, GenerationParams(mode="ar", max_tokens=19), spec)
    with_adapter = generate(runtime, PROMPTS, GenerationParams(mode="speculative", max_tokens=19), spec)
    without = generate(runtime, PROMPTS, GenerationParams(mode="speculative", max_tokens=19, draft_adapter=False),
                       spec)
    assert [g.tokens for g in with_adapter] == [g.tokens for g in ar] == [g.tokens for g in without]
    assert all(g.verify_passes > 0 for g in with_adapter)


def test_only_speculative_drafting_passes_set_draft(checkpoint, config, spec):
    runtime = TorchRuntime(eager(checkpoint), CacheLayout.from_config(config))
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    forward = runtime.forward

    def record(*args):
        seen.append((args[5].copy(), args[7].copy()))
        return forward(*args)

    runtime.forward = record  # type: ignore[method-assign]
    for mode in ("ar", "diffusion"):
        seen.clear()
        generate(runtime, PROMPTS, GenerationParams(mode=mode, max_tokens=12), spec)
        assert not any(d.any() for _, d in seen)
    seen.clear()
    generate(runtime, PROMPTS, GenerationParams(mode="speculative", max_tokens=12), spec)
    drafts = np.concatenate([d for _, d in seen])
    causal = np.concatenate([c for c, _ in seen])
    assert drafts.any() and not (drafts & causal).any()  # drafting rows only, never a causal (verifying) row


def test_a_graph_without_adapter_keeps_the_old_inputs(checkpoint, tmp_path):
    out = tmp_path / "plain"
    assert main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--max-batch", "2",
                 "--max-context", "32", "--no-draft-adapter"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["artifacts"]["model.onnx"]
    assert entry["contract"]["draft_adapter"] is False and "draft_adapter" not in entry
    runtime = load_runtime("onnxruntime", out, json.loads((checkpoint / "config.json").read_text()), threads=1)
    assert not runtime.has_draft_adapter
    assert "draft" not in [i.name for i in runtime.session.get_inputs()]


def test_a_bad_adapter_is_refused_at_export_naming_file_and_tensor(checkpoint, tmp_path, capsys):
    bad = tmp_path / "checkpoint"
    bad.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    config = ModelConfig.from_file(checkpoint)
    inner = config.num_attention_heads * config.head_dim
    layers = config.num_hidden_layers
    save_adapter(bad / ADAPTER_DIR, [torch.zeros(RANK, inner)] * layers, [torch.zeros(config.hidden_size, RANK + 1)] * layers,
                 RANK, ALPHA)
    assert main(["onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and "lora_B" in err


def test_verifying_passes_carry_a_look_ahead_row_within_the_limits(checkpoint, config, spec):
    """With an adapter, each verifying pass also drafts the next block: a bidirectional drafting row of the block
    plus as many masks, in the same pass; never where the pass limits leave no room for it."""
    from dlm.planner import PassLimits

    runtime = TorchRuntime(eager(checkpoint), CacheLayout.from_config(config))
    block = spec.block_size
    passes: list[tuple[np.ndarray, np.ndarray, int]] = []
    forward = runtime.forward

    def record(*args):
        passes.append((args[5].copy(), args[7].copy(), args[1].shape[1]))
        return forward(*args)

    runtime.forward = record  # type: ignore[method-assign]
    params = GenerationParams(mode="speculative", max_tokens=40)
    generate(runtime, PROMPTS[:2], params, spec)
    look_ahead = [(c, d) for c, d, t in passes if c.any() and (d & ~c).any() and t == 2 * block]
    assert look_ahead, "no verifying pass carried a look-ahead row"
    passes.clear()
    generate(runtime, PROMPTS[:2], params, spec, limits=PassLimits(1, 64, 64, 2 * block, 64))
    assert all(len(c) == 1 for c, _, _ in passes) and all(t <= block for _, d, t in passes if d.any())
    passes.clear()
    generate(runtime, PROMPTS[:2], dataclasses.replace(params, draft_adapter=False), spec)
    assert not any(d.any() for _, d, _ in passes)
