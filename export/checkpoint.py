"""Load and save HuggingFace-format checkpoints: `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`; bf16, fp16 or fp32 weights; and the tokenizer from `tokenizer.json`.

Loading checks the tensor set against the layout the config implies: a missing, extra or misshapen tensor is a
`CheckpointError` that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from dlm import tokenizer_files
from export.config import ModelConfig
from export.model import DiffusionLM, expected_tensor_shapes, yarn_inverse_frequencies

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor or file."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype '{name}': expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded checkpoint, checked against the shard index."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path} is not a valid shard index: {e}") from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise CheckpointError(f"{index_path}: shard name '{shard}' must be a plain file name")
            for name, tensor in _read_safetensors(directory / shard).items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"tensor '{name}' is in {shard} but the index places it in {weight_map.get(name)}")
                tensors[name] = tensor
        for name, shard in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"tensor '{name}' is listed in the index but missing from {shard}")
        return tensors
    if (directory / SINGLE_FILE).is_file():
        return _read_safetensors(directory / SINGLE_FILE)
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def validate_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    expected = expected_tensor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"unexpected tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
        if tensors[name].dtype not in DTYPES.values():
            raise CheckpointError(f"tensor '{name}' has dtype {tensors[name].dtype}, expected bf16, fp16 or fp32")


def load_checkpoint(directory: str | Path, dtype: str | torch.dtype | None = None) -> DiffusionLM:
    """The model in eval mode, weights cast to `dtype` (default: the config's dtype). The module is built on the meta
    device and takes the checkpoint's tensors as they are (`assign=True`): no random model is materialised first
    (that would be 56 GB of fp32 for 14B), and at the checkpoint's own dtype no weight is copied."""
    directory = Path(directory)
    config = ModelConfig.from_file(directory)
    tensors = read_state_dict(directory)
    validate_state_dict(config, tensors)
    target = torch_dtype(dtype) if isinstance(dtype, str) else dtype or torch_dtype(config.dtype)
    with torch.device("meta"):
        model = DiffusionLM(config)
    model.load_state_dict({k: v.to(target) for k, v in tensors.items()}, strict=True, assign=True)
    model.inv_freq = yarn_inverse_frequencies(config)[0]  # a non-persistent buffer: still on meta, recomputed
    return model.eval()


def save_checkpoint(
    model: DiffusionLM, directory: str | Path, dtype: str = "bfloat16", max_shard_bytes: int | None = None
) -> None:
    """Write config.json and the weights; with `max_shard_bytes`, shards plus an index as HuggingFace writes them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = torch_dtype(dtype)
    tensors = {k: v.detach().to(target).contiguous() for k, v in model.base_state_dict().items()}
    validate_state_dict(model.config, tensors)
    config_dict = model.config.to_dict() | {"dtype": dtype}
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(directory / SINGLE_FILE), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer.json as transformers 5 runs it (`dlm.tokenizer_files`)."""
    try:
        return tokenizer_files.load_tokenizer(directory)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
