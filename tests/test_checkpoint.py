"""Checkpoint format: the real tensor layout, sharding, dtypes and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from export.config import ConfigError, ModelConfig


def real_layout_names(layers: int) -> set[str]:
    """The tensor names of a Nemotron-Labs Diffusion checkpoint, written out from the published layout."""
    names = {"encoder.embed_tokens.weight", "encoder.norm.weight", "diffusion_head.weight"}
    for i in range(layers):
        names |= {
            f"encoder.layers.{i}.input_layernorm.weight",
            f"encoder.layers.{i}.post_attention_layernorm.weight",
            *(f"encoder.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"),
            *(f"encoder.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        }
    return names


def test_tensor_names_and_shapes_are_the_real_layout(tiny_model, tiny_config_dict, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    layers = tiny_config_dict["num_hidden_layers"]
    assert set(shapes) == real_layout_names(layers)
    assert len(shapes) == 3 + 9 * layers
    c = tiny_config_dict
    h, d, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    assert shapes["encoder.embed_tokens.weight"] == (c["vocab_size"], h)
    assert shapes["diffusion_head.weight"] == (c["vocab_size"], h)
    assert shapes["encoder.layers.0.self_attn.q_proj.weight"] == (heads * d, h)  # head_dim is explicit, not h/heads
    assert shapes["encoder.layers.0.self_attn.k_proj.weight"] == (kv * d, h)
    assert shapes["encoder.layers.0.self_attn.o_proj.weight"] == (h, heads * d)
    assert shapes["encoder.layers.1.mlp.down_proj.weight"] == (h, c["intermediate_size"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(tiny_config_dict) <= set(saved)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes_round_trip(tiny_model, tmp_path, dtype):
    save_checkpoint(tiny_model, tmp_path, dtype=dtype)
    loaded = load_checkpoint(tmp_path)
    assert loaded.dtype == getattr(torch, dtype)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(getattr(torch, dtype)))


def test_sharded_copy_loads_identical_weights(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "single", dtype="float32")
    save_checkpoint(tiny_model, tmp_path / "sharded", dtype="float32", max_shard_bytes=60_000)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single, sharded = load_checkpoint(tmp_path / "single"), load_checkpoint(tmp_path / "sharded")
    for name, tensor in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name


def test_corrupted_shard_fails_naming_the_file(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(tmp_path)


def test_corrupted_single_file_fails_naming_the_file(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def _rewrite(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_missing_extra_and_misshapen_tensors_are_named(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layers\.1\.mlp\.up_proj\.weight'"):
        load_checkpoint(tmp_path)

    save_checkpoint(tiny_model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'lm_head\.weight'"):
        load_checkpoint(tmp_path)

    save_checkpoint(tiny_model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.norm.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"'encoder\.norm\.weight' has shape \(3,\)"):
        load_checkpoint(tmp_path)


def test_shard_index_pointing_at_a_missing_file(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path, max_shard_bytes=60_000)
    sorted(tmp_path.glob("model-*-of-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing weight file"):
        load_checkpoint(tmp_path)


def test_unsupported_config_values_name_the_key(tiny_config_dict):
    bad = dict(tiny_config_dict, rope_parameters={**tiny_config_dict["rope_parameters"], "rope_type": "linear"})
    with pytest.raises(ConfigError, match=r"'rope_parameters\.rope_type' is 'linear'"):
        ModelConfig.from_dict(bad)
    for key in ("head_dim", "mask_token_id", "block_size", "num_key_value_heads"):
        missing = {k: v for k, v in tiny_config_dict.items() if k != key}
        with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
            ModelConfig.from_dict(missing)
    rope = {k: v for k, v in tiny_config_dict["rope_parameters"].items() if k != "llama_4_scaling_beta"}
    with pytest.raises(ConfigError, match=r"'rope_parameters\.llama_4_scaling_beta'"):
        ModelConfig.from_dict(dict(tiny_config_dict, rope_parameters=rope))
    with pytest.raises(ConfigError, match="'model_type'"):
        ModelConfig.from_dict(dict(tiny_config_dict, model_type="llama"))


def test_eos_list_and_config_round_trip(tiny_config_dict, tmp_path):
    config = ModelConfig.from_dict(dict(tiny_config_dict, eos_token_id=[2, 11]))
    assert config.eos_token_ids == (2, 11)
    config.save(tmp_path)
    again = ModelConfig.from_file(tmp_path)
    assert again == config


def test_loading_builds_no_random_model_and_keeps_the_checkpoint_dtype(tmp_path, monkeypatch):
    """The module is made on the meta device and takes the checkpoint's tensors: no parameter is initialised
    (nn.Linear's reset_parameters never runs on real memory) and a bf16 checkpoint loads as bf16."""
    import torch
    from torch import nn

    from conftest import random_tiny_model
    from export.checkpoint import load_checkpoint, save_checkpoint

    model = random_tiny_model()
    save_checkpoint(model, tmp_path, dtype="bfloat16")
    initialised: list[torch.device] = []
    original = nn.Linear.reset_parameters

    def spy(self):
        initialised.append(self.weight.device)
        original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    loaded = load_checkpoint(tmp_path)
    assert initialised and all(d.type == "meta" for d in initialised)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.inv_freq.device.type == "cpu" and loaded.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.inv_freq, model.inv_freq)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want, _ = model.to(torch.bfloat16).full_logits(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long),
                                                        model.empty_cache(1), torch.tensor(True))
        got, _ = loaded.full_logits(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long),
                                    loaded.empty_cache(1), torch.tensor(True))
    assert torch.equal(got, want)
