"""The optional draft-only LoRA of an instruct checkpoint: the folder `linear_spec_lora/` beside its weights.

Instruct checkpoints of the family may ship a LoRA on every layer's `o_proj` that is applied only on
self-speculation's drafting pass (the bidirectional pass that drafts a whole block); the causal verifying pass, and
the `ar` and `diffusion` modes, never see it. The folder is in PEFT's file format:

- `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `target_modules` ["o_proj"], ...
- `adapter_model.safetensors`: per layer i, `base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_A.weight`
  [r, heads * head_dim] and `...lora_B.weight` [hidden_size, r] (some files spell them `lora_A.default.weight`),
  so that o_proj(x) becomes `W x + (lora_alpha / r) * B (A x)`.

It is loaded as published: nothing is merged, re-scaled or re-trained. Everything this code cannot honour exactly
(another target module, rsLoRA, DoRA, biases, per-layer ranks, ...) is refused with an `AdapterError` that names the
file and the key or tensor, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from export.config import ModelConfig

ADAPTER_DIR = "linear_spec_lora"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TARGET_MODULE = "o_proj"
PREFIX = "base_model.model."

# PEFT options that change what the adapter computes, with the kind of value that leaves them off: `false` flags,
# `null` settings, empty collections, and `bias` "none". Absent or null is always off.
UNSUPPORTED_OPTIONS = {
    "use_rslora": "false",
    "use_dora": "false",
    "bias": '"none"',
    "fan_in_fan_out": "false",
    "layers_to_transform": "null",
    "layers_pattern": "null",
    "rank_pattern": "empty",
    "alpha_pattern": "empty",
    "modules_to_save": "empty",
    "lora_bias": "false",
    "exclude_modules": "empty",
    "megatron_config": "null",
    "use_qalora": "false",
    "trainable_token_indices": "null",
    "target_parameters": "empty",
    # newer PEFT: these change the computation as well (more layers, activated LoRA, expert routing)
    "layer_replication": "null",
    "alora_invocation_tokens": "null",
    "arrow_config": "null",
}
# The fields of an adapter's own config.json that must match the base model's.
BASE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size")
TENSOR_NAME = re.compile(
    r"(?:model\.)?encoder\.layers\.(0|[1-9][0-9]*)\.self_attn\.o_proj\.lora_(A|B)(?:\.default)?\.weight"
)


class AdapterError(ValueError):
    """A draft adapter this code cannot load as published; the message names the file and the key or tensor."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare by
class DraftAdapter:
    path: Path  # the adapter directory
    rank: int
    alpha: float
    lora_a: tuple[torch.Tensor, ...]  # per layer: [rank, num_attention_heads * head_dim], float32
    lora_b: tuple[torch.Tensor, ...]  # per layer: [hidden_size, rank], float32
    sha256: str  # over adapter_config.json's bytes, then adapter_model.safetensors' bytes

    @property
    def scale(self) -> float:
        """PEFT's scaling without rsLoRA."""
        return self.alpha / self.rank


def tensor_name(layer: int, kind: str) -> str:
    """The name PEFT gives layer `layer`'s lora_A (`kind` "A") or lora_B ("B") weight."""
    return f"{PREFIX}encoder.layers.{layer}.self_attn.{TARGET_MODULE}.lora_{kind}.weight"


def find_adapter(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint's draft adapter directory, or None when it ships none."""
    path = Path(checkpoint_dir) / ADAPTER_DIR
    return path if path.is_dir() else None


def _is_off(value: Any, off: str) -> bool:
    if value is None:
        return True
    if off == "false":
        return value is False
    if off == '"none"':
        return value == "none"
    if off == "empty":
        return isinstance(value, (list, dict, str)) and len(value) == 0
    return False  # "null": anything but null is set


def _check_config(path: Path, data: Any) -> tuple[int, float]:
    """The rank and alpha of a parsed adapter_config.json, after every check."""
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if "peft_type" in data and data["peft_type"] != "LORA":
        raise AdapterError(f"{path}: 'peft_type' is {data['peft_type']!r}, only 'LORA' is supported")
    rank = data.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{path}: 'r' is {rank!r}, expected a positive integer")
    alpha = data.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{path}: 'lora_alpha' is {alpha!r}, expected a positive number")
    targets = data.get("target_modules")
    if targets != TARGET_MODULE and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets) and set(targets) == {TARGET_MODULE}
    ):
        raise AdapterError(
            f"{path}: 'target_modules' is {json.dumps(targets)}, only [\"{TARGET_MODULE}\"] is supported "
            f"(the draft adapter is a LoRA on o_proj alone)"
        )
    for key, off in UNSUPPORTED_OPTIONS.items():
        if not _is_off(data.get(key), off):
            raise AdapterError(f"{path}: '{key}' is {json.dumps(data[key])}, not supported (expected {off} or absent)")
    return rank, float(alpha)


def _check_base(path: Path, config: ModelConfig, base_dir: str | Path | None) -> None:
    """An adapter's own config.json must describe the base model it is loaded onto."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(data).__name__}")
    base = f"the base model's ({Path(base_dir) / 'config.json'})" if base_dir is not None else "the base model's"
    for name in BASE_FIELDS:
        if name in data and data[name] != getattr(config, name):
            raise AdapterError(
                f"{path}: '{name}' is {data[name]!r} but {base} is {getattr(config, name)!r}: "
                f"the adapter was made for another model"
            )


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_adapter(directory: str | Path, config: ModelConfig, base_dir: str | Path | None = None) -> DraftAdapter:
    """The draft adapter in `directory`, checked against the base model's `config` (`base_dir` names it in
    messages); tensors as float32, ordered by layer."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: missing (a draft adapter holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{config_path}: cannot read it as JSON: {e}") from e
    rank, alpha = _check_config(config_path, data)
    if (directory / "config.json").is_file():
        _check_base(directory / "config.json", config, base_dir)

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_path}: cannot read it as safetensors: {e}") from e
    found: dict[tuple[int, str], torch.Tensor] = {}
    names: dict[tuple[int, str], str] = {}
    for name in sorted(tensors, key=lambda n: (len(n), n)):  # the plain spelling first: a longer copy is the extra
        match = TENSOR_NAME.fullmatch(name[len(PREFIX):]) if name.startswith(PREFIX) else None
        key = (int(match.group(1)), match.group(2)) if match else None
        if key is not None and key in names:
            raise AdapterError(f"{weights_path}: unexpected tensor '{name}' (the same tensor as '{names[key]}')")
        if key is None or key[0] >= config.num_hidden_layers:
            raise AdapterError(
                f"{weights_path}: unexpected tensor '{name}' (expected only the lora_A and lora_B weights of "
                f"{TARGET_MODULE} in layers 0..{config.num_hidden_layers - 1})"
            )
        found[key], names[key] = tensors[name], name

    heads_dim = config.num_attention_heads * config.head_dim
    expected = {"A": (rank, heads_dim), "B": (config.hidden_size, rank)}
    rank_axis = {"A": 0, "B": 1}
    for layer in range(config.num_hidden_layers):
        for kind in ("A", "B"):
            if (layer, kind) not in found:
                raise AdapterError(f"{weights_path}: missing tensor '{tensor_name(layer, kind)}'")
            tensor, shape, name = found[(layer, kind)], expected[kind], names[(layer, kind)]
            if tuple(tensor.shape) != shape:
                axis = rank_axis[kind]
                other = 1 - axis
                if tensor.dim() == 2 and tensor.shape[other] == shape[other]:
                    raise AdapterError(
                        f"{weights_path}: tensor '{name}' has rank {tensor.shape[axis]} (shape {list(tensor.shape)}) "
                        f"but {CONFIG_FILE} gives r {rank} (expected shape {list(shape)})"
                    )
                raise AdapterError(
                    f"{weights_path}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}"
                )
            if not tensor.is_floating_point():
                raise AdapterError(f"{weights_path}: tensor '{name}' has dtype {tensor.dtype}, expected floating point")
            tensor = tensor.to(torch.float32).contiguous()
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{weights_path}: tensor '{name}' holds non-finite values")
            found[(layer, kind)] = tensor

    def per_layer(kind: str) -> tuple[torch.Tensor, ...]:
        return tuple(found[(layer, kind)] for layer in range(config.num_hidden_layers))

    return DraftAdapter(
        path=directory, rank=rank, alpha=alpha, lora_a=per_layer("A"), lora_b=per_layer("B"),
        sha256=_sha256(config_path, weights_path),
    )


def save_adapter(
    directory: str | Path,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    rank: int,
    alpha: float,
    base_model: str = "",
) -> None:
    """Write a draft adapter in PEFT's format (float32 tensors), as `load_adapter` reads it back."""
    directory = Path(directory)
    if len(lora_a) != len(lora_b):
        raise AdapterError(f"{directory}: {len(lora_a)} lora_A tensors but {len(lora_b)} lora_B tensors")
    tensors: dict[str, torch.Tensor] = {}
    def copy(tensor: torch.Tensor) -> torch.Tensor:
        # a contiguous copy: safetensors refuses tensors that share memory (slices of one stacked tensor, say)
        return tensor.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)

    for layer, (a, b) in enumerate(zip(lora_a, lora_b)):
        tensors[tensor_name(layer, "A")], tensors[tensor_name(layer, "B")] = copy(a), copy(b)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": [TARGET_MODULE],
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def attach_adapter(model: Any, checkpoint: str | Path, choice: str | Path | None = "auto") -> DraftAdapter | None:
    """Attach a draft adapter to `model` (an `export.model.DiffusionLM`): "auto" the checkpoint's
    `linear_spec_lora/` when there is one, a path that adapter, None none. Returns what was attached."""
    directory = find_adapter(checkpoint) if choice == "auto" else choice
    if directory is None:
        return None
    adapter = load_adapter(directory, model.config, checkpoint)
    model.attach_draft_adapter(adapter)
    return adapter


def adapter_sha256(directory: str | Path | None) -> str | None:
    """The hash a manifest records for the adapter in `directory` (None for no adapter)."""
    if directory is None:
        return None
    return _sha256(Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE)
