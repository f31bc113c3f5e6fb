"""The draft-only LoRA (`linear_spec_lora/`): PEFT's file format written and read back, and every refusal naming
the file and the key or tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG
from export.adapter import (
    ADAPTER_DIR,
    BASE_FIELDS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    find_adapter,
    load_adapter,
    save_adapter,
)
from export.config import ModelConfig

RANK, ALPHA = 8, 32.0
CONFIG = ModelConfig.from_dict(TINY_CONFIG)
LAYERS = CONFIG.num_hidden_layers
IN = CONFIG.num_attention_heads * CONFIG.head_dim
OUT = CONFIG.hidden_size


def name(layer: int, kind: str, spelling: str = "") -> str:
    return f"base_model.model.encoder.layers.{layer}.self_attn.o_proj.lora_{kind}{spelling}.weight"


def random_weights(rank: int = RANK) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    lora_a = [torch.randn(rank, IN, generator=generator) for _ in range(LAYERS)]
    lora_b = [torch.randn(OUT, rank, generator=generator) for _ in range(LAYERS)]
    return lora_a, lora_b


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A valid adapter directory, written by save_adapter."""
    directory = tmp_path / ADAPTER_DIR
    save_adapter(directory, *random_weights(), rank=RANK, alpha=ALPHA, base_model="tiny")
    return directory


def edit_config(directory: Path, **changes) -> Path:
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def edit_tensors(directory: Path, add: dict[str, torch.Tensor] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Rewrite the weights without the tensors in `drop` and with those in `add` (replacing any of the same name)."""
    path = directory / WEIGHTS_FILE
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(path))
    return path


def refused(directory: Path, *fragments: str, base_dir: Path | None = None) -> str:
    """load_adapter's refusal, checked to contain every fragment."""
    with pytest.raises(AdapterError) as info:
        load_adapter(directory, CONFIG, base_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_round_trip(adapter: Path):
    lora_a, lora_b = random_weights()
    loaded = load_adapter(adapter, CONFIG)
    assert (loaded.path, loaded.rank, loaded.alpha, loaded.scale) == (adapter, RANK, ALPHA, ALPHA / RANK)
    assert len(loaded.lora_a) == len(loaded.lora_b) == LAYERS
    for got, want in zip(loaded.lora_a + loaded.lora_b, lora_a + lora_b):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    expected = hashlib.sha256((adapter / CONFIG_FILE).read_bytes() + (adapter / WEIGHTS_FILE).read_bytes())
    assert loaded.sha256 == expected.hexdigest()


def test_save_takes_views_of_one_stacked_tensor(tmp_path: Path):
    lora_a, lora_b = random_weights()
    stacked_a, stacked_b = torch.stack(lora_a).to(torch.bfloat16), torch.stack(lora_b).transpose(1, 2)
    save_adapter(tmp_path, list(stacked_a), [b.T for b in stacked_b], rank=RANK, alpha=ALPHA)
    loaded = load_adapter(tmp_path, CONFIG)
    assert torch.equal(loaded.lora_a[1], lora_a[1].to(torch.bfloat16).float())
    assert torch.equal(loaded.lora_b[1], lora_b[1])


def test_saved_files_are_peft_format(adapter: Path):
    data = json.loads((adapter / CONFIG_FILE).read_text())
    assert data == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": RANK,
        "lora_alpha": ALPHA, "target_modules": ["o_proj"], "use_rslora": False, "use_dora": False, "bias": "none",
        "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True,
    }
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    assert set(tensors) == {name(i, k) for i in range(LAYERS) for k in "AB"}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())


def test_find_adapter(tmp_path: Path, adapter: Path):
    assert find_adapter(tmp_path) == adapter
    assert find_adapter(str(tmp_path)) == adapter
    assert find_adapter(tmp_path / "elsewhere") is None
    (tmp_path / "file_only").mkdir()
    (tmp_path / "file_only" / ADAPTER_DIR).write_text("not a folder")
    assert find_adapter(tmp_path / "file_only") is None


@pytest.mark.parametrize("infix, suffix", [("", ".default"), ("model.", ""), ("model.", ".default")])
def test_other_tensor_spellings_are_accepted(adapter: Path, infix: str, suffix: str):
    lora_a, lora_b = random_weights()
    tensors = {}
    for i in range(LAYERS):
        for kind, tensor in (("A", lora_a[i]), ("B", lora_b[i])):
            key = f"base_model.model.{infix}encoder.layers.{i}.self_attn.o_proj.lora_{kind}{suffix}.weight"
            tensors[key] = tensor.to(torch.bfloat16)
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    loaded = load_adapter(adapter, CONFIG)
    assert loaded.lora_a[1].dtype == torch.float32
    assert torch.equal(loaded.lora_a[1], lora_a[1].to(torch.bfloat16).float())
    assert torch.equal(loaded.lora_b[0], lora_b[0].to(torch.bfloat16).float())


@pytest.mark.parametrize("changes", [
    {"target_modules": "o_proj"},
    {"target_modules": ["o_proj", "o_proj"]},
    {"r": RANK, "lora_alpha": 512},
    # harmless keys, and every unsupported option at its off value
    {"lora_dropout": 0.1, "auto_mapping": None, "revision": None, "peft_version": "0.17.0", "init_lora_weights": True,
     "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False, "layers_to_transform": None,
     "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "lora_bias": False,
     "exclude_modules": None, "megatron_config": None, "use_qalora": False, "trainable_token_indices": None,
     "target_parameters": []},
])
def test_accepted_configs(adapter: Path, changes: dict):
    edit_config(adapter, **changes)
    assert load_adapter(adapter, CONFIG).scale == changes.get("lora_alpha", ALPHA) / RANK


@pytest.mark.parametrize("which", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file(adapter: Path, which: str):
    (adapter / which).unlink()
    refused(adapter, str(adapter / which), "missing")


def test_missing_directory(tmp_path: Path):
    refused(tmp_path / ADAPTER_DIR, str(tmp_path / ADAPTER_DIR / CONFIG_FILE))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"o_proj"'])
def test_bad_json(adapter: Path, text: str):
    (adapter / CONFIG_FILE).write_text(text)
    refused(adapter, str(adapter / CONFIG_FILE))


def test_unreadable_weights(adapter: Path):
    (adapter / WEIGHTS_FILE).write_bytes(b"not safetensors")
    refused(adapter, str(adapter / WEIGHTS_FILE))


@pytest.mark.parametrize("key, value", [
    ("peft_type", "LOHA"), ("r", 0), ("r", 8.5), ("r", True), ("r", None), ("lora_alpha", 0), ("lora_alpha", -1.0),
    ("lora_alpha", "512"), ("lora_alpha", None),
])
def test_bad_values(adapter: Path, key: str, value):
    path = edit_config(adapter, **{key: value})
    refused(adapter, str(path), f"'{key}'")


@pytest.mark.parametrize("targets, named", [
    (["q_proj"], "q_proj"),
    (["o_proj", "v_proj"], "v_proj"),
    (".*o_proj", ".*o_proj"),
    ("all-linear", "all-linear"),
    ([], "[]"),
    (None, "null"),
])
def test_target_modules_other_than_o_proj(adapter: Path, targets, named: str):
    path = edit_config(adapter, target_modules=targets)
    refused(adapter, str(path), "'target_modules'", named, '["o_proj"]')


@pytest.mark.parametrize("key, value", [
    ("use_rslora", True), ("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("fan_in_fan_out", True),
    ("layers_to_transform", [0]), ("layers_pattern", "layers"), ("rank_pattern", {"o_proj": 4}),
    ("alpha_pattern", {"o_proj": 4}), ("modules_to_save", ["diffusion_head"]), ("lora_bias", True),
    ("exclude_modules", ["encoder.layers.0.self_attn.o_proj"]), ("megatron_config", {}), ("use_qalora", True),
    ("trainable_token_indices", [100]), ("target_parameters", ["mlp.experts.down_proj"]),
    ("layer_replication", [[0, 2]]), ("alora_invocation_tokens", [1, 2]), ("arrow_config", {"top_k": 3}),
])
def test_unsupported_options_are_refused_by_name(adapter: Path, key: str, value):
    path = edit_config(adapter, **{key: value})
    refused(adapter, str(path), f"'{key}'", json.dumps(value))


def test_missing_tensor(adapter: Path):
    path = edit_tensors(adapter, drop=(name(1, "B"),))
    refused(adapter, str(path), "missing", name(1, "B"))


def test_missing_tensor_is_named_in_the_plain_spelling(adapter: Path):
    lora_a, _ = random_weights()
    path = edit_tensors(adapter, {name(0, "A", ".default"): lora_a[0]}, drop=(name(0, "A"),))
    edit_tensors(adapter, drop=(name(1, "A"),))
    refused(adapter, str(path), "missing", name(1, "A"))


@pytest.mark.parametrize("extra, why", [
    ("base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "lora_A and lora_B weights of o_proj"),
    (f"base_model.model.encoder.layers.{LAYERS}.self_attn.o_proj.lora_A.weight", f"layers 0..{LAYERS - 1}"),
    ("base_model.model.encoder.layers.01.self_attn.o_proj.lora_A.weight", "layers 0.."),
    ("base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.draft.weight", "o_proj"),
    ("base_model.model.encoder.layers.0.self_attn.o_proj.lora_magnitude_vector", "o_proj"),
    ("encoder.layers.0.self_attn.o_proj.lora_A.weight", "o_proj"),
    (name(0, "A", ".default"), f"the same tensor as '{name(0, 'A')}'"),
    ("base_model.model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight", f"the same tensor as '{name(0, 'A')}'"),
])
def test_unexpected_tensor(adapter: Path, extra: str, why: str):
    path = edit_tensors(adapter, {extra: torch.zeros(RANK, IN)})
    refused(adapter, str(path), f"unexpected tensor '{extra}'", why)


@pytest.mark.parametrize("kind, shape", [("A", (4, IN)), ("B", (OUT, 4))])
def test_rank_mismatch(adapter: Path, kind: str, shape: tuple[int, int]):
    path = edit_tensors(adapter, {name(1, kind): torch.zeros(shape)})
    refused(adapter, str(path), name(1, kind), "rank 4", f"r {RANK}", CONFIG_FILE)


@pytest.mark.parametrize("kind, shape, expected", [
    ("A", (RANK, OUT), [RANK, IN]),
    ("B", (IN, RANK), [OUT, RANK]),
    ("A", (RANK * IN,), [RANK, IN]),
    ("B", (1, OUT, RANK), [OUT, RANK]),
])
def test_wrong_shape(adapter: Path, kind: str, shape: tuple[int, ...], expected: list[int]):
    path = edit_tensors(adapter, {name(0, kind): torch.zeros(shape)})
    refused(adapter, str(path), name(0, kind), str(list(shape)), f"expected {expected}")


def test_integer_dtype_is_refused(adapter: Path):
    path = edit_tensors(adapter, {name(0, "A"): torch.zeros(RANK, IN, dtype=torch.int32)})
    refused(adapter, str(path), name(0, "A"), "floating point")


def test_non_finite_values_are_refused(adapter: Path):
    path = edit_tensors(adapter, {name(1, "B"): torch.full((OUT, RANK), float("nan"))})
    refused(adapter, str(path), name(1, "B"), "non-finite")


def test_matching_config_json_is_accepted(adapter: Path):
    (adapter / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert load_adapter(adapter, CONFIG).rank == RANK


@pytest.mark.parametrize("field", BASE_FIELDS)
def test_config_json_of_another_model(tmp_path: Path, adapter: Path, field: str):
    other = {**TINY_CONFIG, field: TINY_CONFIG[field] * 2}
    (adapter / "config.json").write_text(json.dumps(other))
    refused(adapter, str(adapter / "config.json"), f"'{field}' is {other[field]}", str(TINY_CONFIG[field]),
            str(tmp_path / "config.json"), base_dir=tmp_path)


def test_unreadable_config_json(adapter: Path):
    (adapter / "config.json").write_text("{")
    refused(adapter, str(adapter / "config.json"))


def test_save_refuses_unequal_layer_counts(tmp_path: Path):
    lora_a, lora_b = random_weights()
    with pytest.raises(AdapterError, match="2 lora_A tensors but 1 lora_B"):
        save_adapter(tmp_path, lora_a, lora_b[:1], rank=RANK, alpha=ALPHA)
