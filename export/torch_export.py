"""Trace the denoiser with `torch.export`: the program the ONNX exporter converts, and the `model.pt2` artifact the
PyTorch runtime loads, so the serving code never imports the model's Python source.

Names and dynamic axes come from the engine contract (`dlm.contract`). The example inputs use sizes of at least 2
on every dynamic axis, because torch.export specializes an axis whose example size is 0 or 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.contract import BATCH, DEFAULT_TOP_K, MIN_TOP_K, PAST, PAST_PLUS_TOKENS, POSITIONS, TOKENS, EngineContract, Profile
from export.adapter import attach_adapter
from export.checkpoint import load_checkpoint
from export.config import ModelConfig
from export.manifest import checkpoint_sha256, write_entry
from export.model import DiffusionLM

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # export precision -> cache / weight dtype
AXIS_MIN = {BATCH: 1, TOKENS: 1, PAST: 0, PAST_PLUS_TOKENS: 1, POSITIONS: 1}
TORCH_EXPORT_FILE = "model.pt2"
# serving limits when the command line gives none: enough for the miniature's tasks
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CONTEXT = 1024


def profile_for(
    config: ModelConfig, max_batch: int = DEFAULT_MAX_BATCH, max_context: int | None = None,
    max_tokens: int | None = None, max_block: int | None = None,
) -> Profile:
    """Profile ranges from the model's limits (block size, max_position_embeddings) and the serving limits."""
    max_context = max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if max_context > config.max_position_embeddings:
        raise ValueError(
            f"max_context {max_context} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    return Profile.from_limits(config.block_size, max_batch, max_context, max_tokens, max_block)


def limits_options(profile: Profile, top_k: int) -> str:
    """The command-line options that rebuild `profile` and the candidate count."""
    return (f"--max-batch {profile.batch[2]} --max-context {profile.max_context} --max-tokens {profile.tokens[2]} "
            f"--max-block {profile.max_block} --top-k {top_k}")


def sample_inputs(
    contract: EngineContract, batch: int, tokens: int, past: int, seed: int = 0, positions: int | None = None
) -> dict[str, np.ndarray]:
    """A valid feed of the given shape: real token ids and positions, left padding on the second row, a random
    cache, causal and bidirectional rows mixed, and `positions` (default: all of `tokens`, within the profile's
    N) positions to predict from, in a shuffled order."""
    n = min(tokens, contract.profile.max_block) if positions is None else positions
    rng = np.random.default_rng(seed)
    position_ids = past + np.arange(tokens, dtype=np.int64)
    mask = np.ones((batch, past + tokens), dtype=np.int64)
    if batch > 1 and past > 1:
        mask[1, : past // 2] = 0  # a shorter cached prefix on row 1
    cache_shape = (batch, contract.num_layers, 2, contract.num_kv_heads, past, contract.head_dim)
    draft = {"draft": np.arange(batch) % 2 == 1} if contract.draft_adapter else {}  # the bidirectional rows draft
    return {
        "input_ids": rng.integers(0, contract.vocab_size, (batch, tokens), dtype=np.int64),
        "position_ids": np.broadcast_to(position_ids, (batch, tokens)).copy(),
        "attention_mask": mask,
        "past_key_values": rng.standard_normal(cache_shape).astype(numpy_dtype(contract.cache_dtype)),
        "causal": np.arange(batch) % 2 == 0,
        "logit_positions": np.stack([rng.permutation(tokens)[:n] if n <= tokens else rng.integers(0, tokens, n)
                                     for _ in range(batch)]).astype(np.int64),
        **draft,
        **({"token_bitmask": sample_bitmask(contract, batch, n, rng)} if contract.structured else {}),
    }


def sample_bitmask(contract: EngineContract, batch: int, positions: int, rng: np.random.Generator) -> np.ndarray:
    """[B, N, W] int32: about a quarter of the vocabulary disallowed at random on row 0 (more than K stay allowed
    at the vocabularies exported, so the candidates are well defined), every token allowed on the other rows."""
    words = np.full((batch, positions, contract.bitmask_words), -1, dtype=np.int32)
    bits = rng.integers(0, 2**32, (positions, contract.bitmask_words), dtype=np.uint64)
    words[0] = (bits | rng.integers(0, 2**32, bits.shape, dtype=np.uint64)).astype(np.uint32).view(np.int32)
    return words


def numpy_dtype(name: str) -> np.dtype:
    """numpy's dtype for a cache dtype name; bfloat16 comes from ml_dtypes (numpy has none)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, bfloat16 (ml_dtypes) included, which torch cannot read directly."""
    if array.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def trace(model: DiffusionLM, contract: EngineContract) -> torch.export.ExportedProgram:
    """`torch.export` of `model.forward` with the contract's dynamic axes (unbounded above: the profile is
    enforced by the runtimes and the TensorRT build, so one graph serves any profile)."""
    dims = {axis: torch.export.Dim(axis, min=low) for axis, low in AXIS_MIN.items()}
    dynamic_shapes = {
        spec.name: {i: dims[d] for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in contract.inputs
    }
    example = sample_inputs(contract, batch=2, tokens=3, past=5, positions=2)
    # token_bitmask by name (draft, before it in the signature, may be absent), the rest in order as before
    args = tuple(to_torch(example[name]) for name in contract.input_names if name != "token_bitmask")
    kwargs = {"token_bitmask": to_torch(example["token_bitmask"])} if contract.structured else {}
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def contract_for(model: DiffusionLM, precision: str, profile: Profile) -> EngineContract:
    config = model.config.to_dict()
    return EngineContract.from_config(config, PRECISIONS[precision], profile, model.top_k, model.has_draft_adapter,
                                      model.structured)


def adapter_record(model: DiffusionLM) -> dict[str, Any]:
    """What a manifest entry records of the draft adapter the graph carries (nothing without one)."""
    adapter = model.draft_adapter
    if adapter is None:
        return {}
    return {"draft_adapter": {"sha256": adapter.sha256, "rank": adapter.rank, "alpha": adapter.alpha,
                              "path": str(adapter.path)}}


def adapter_option(model: DiffusionLM) -> str:
    """The command-line option that rebuilds the graph with the same adapter choice."""
    option = f" --draft-adapter {model.draft_adapter.path}" if model.draft_adapter else " --no-draft-adapter"
    return option + (" --structured" if model.structured else "")


def load_for_export(
    checkpoint: str | Path, precision: str, top_k: int = DEFAULT_TOP_K, draft_adapter: str | Path | None = "auto",
    structured: bool = False,
) -> DiffusionLM:
    """The model to trace. `draft_adapter`: "auto" attaches the checkpoint's `linear_spec_lora/` when there is one,
    a path attaches that adapter, None none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' cannot be exported: expected one of {', '.join(PRECISIONS)}")
    model = load_checkpoint(checkpoint, dtype=PRECISIONS[precision])
    attach_adapter(model, checkpoint, draft_adapter)
    if not MIN_TOP_K <= top_k < model.config.vocab_size:
        raise ValueError(
            f"--top-k must be in [{MIN_TOP_K}, {model.config.vocab_size - 1}] (at least 20 for OpenAI's "
            f"top_logprobs, below the vocabulary of {model.config.vocab_size}), got {top_k}"
        )
    model.top_k = top_k
    model.structured = structured  # traced with token_bitmask (engine contract version 3)
    return model


def save_torch_export(
    program: torch.export.ExportedProgram,
    out: Path,
    checkpoint: str | Path,
    precision: str,
    contract: EngineContract,
    command: str,
    **extra: Any,
) -> Path:
    """Write `model.pt2` and its manifest entry (`extra`: more fields of the entry, the draft adapter's record)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / TORCH_EXPORT_FILE
    torch.export.save(program, str(path))
    write_entry(
        out,
        "torch_export",
        files=[TORCH_EXPORT_FILE],
        config=json.loads((Path(checkpoint) / "config.json").read_text()),
        checkpoint_hash=checkpoint_sha256(checkpoint),
        precision=precision,
        contract=contract,
        command=command,
        **extra,
    )
    return path


def export_torch(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_context: int | None = None,
    max_tokens: int | None = None,
    max_block: int | None = None,
    top_k: int = DEFAULT_TOP_K,
    draft_adapter: str | Path | None = "auto",
    structured: bool = False,
) -> Path:
    """Checkpoint → `model.pt2` and its manifest entry."""
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_for_export(checkpoint, precision, top_k, draft_adapter, structured)
    contract = contract_for(model, precision, profile_for(model.config, max_batch, max_context, max_tokens, max_block))
    command = (
        f"python -m export torch-export --checkpoint {checkpoint} --out {out} --precision {precision} "
        + limits_options(contract.profile, contract.top_k) + adapter_option(model)
    )
    return save_torch_export(trace(model, contract), out, checkpoint, precision, contract, command,
                             **adapter_record(model))
