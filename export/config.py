"""The model configuration, read from a HuggingFace `config.json` of the Nemotron-Labs Diffusion family.

Every id and size comes from the file; nothing is hard-coded. A key this code cannot honour (a missing one, another
`rope_type`, another activation) is refused with a `ConfigError` that names the key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "NemotronLabsDiffusionModel"
MODEL_TYPE = "nemotron_labs_diffusion"


class ConfigError(ValueError):
    """A config.json this code cannot load; the message names the offending key."""


@dataclass(frozen=True)
class RopeParameters:
    """YaRN rotary embedding plus the Llama-4 style query scaling by position (transformers' Ministral3)."""

    rope_theta: float
    factor: float
    original_max_position_embeddings: int
    llama_4_scaling_beta: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeParameters
    mask_token_id: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    dtype: str = "bfloat16"
    # The whole file as read, so that saving a checkpoint writes back every key (auto_map, versions, ...).
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        def need(key: str, where: dict[str, Any] = data, prefix: str = "") -> Any:
            if key not in where or where[key] is None:
                raise ConfigError(f"config.json: missing required key '{prefix}{key}'")
            return where[key]

        architectures = need("architectures")
        if ARCHITECTURE not in architectures:
            raise ConfigError(f"config.json: 'architectures' is {architectures}, expected to contain '{ARCHITECTURE}'")
        if need("model_type") != MODEL_TYPE:
            raise ConfigError(f"config.json: 'model_type' is '{data['model_type']}', expected '{MODEL_TYPE}'")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: 'hidden_act' is '{act}', only 'silu' is supported")
        if data.get("tie_word_embeddings", False):
            raise ConfigError("config.json: 'tie_word_embeddings' is true, but the family has an untied diffusion_head")

        rope_raw = need("rope_parameters")
        if not isinstance(rope_raw, dict):
            raise ConfigError("config.json: 'rope_parameters' must be an object")
        rope_type = need("rope_type", rope_raw, "rope_parameters.")
        if rope_type != "yarn":
            raise ConfigError(
                f"config.json: 'rope_parameters.rope_type' is '{rope_type}', only 'yarn' is supported"
            )
        rope = RopeParameters(
            rope_theta=float(need("rope_theta", rope_raw, "rope_parameters.")),
            factor=float(need("factor", rope_raw, "rope_parameters.")),
            original_max_position_embeddings=int(
                need("original_max_position_embeddings", rope_raw, "rope_parameters.")
            ),
            llama_4_scaling_beta=float(need("llama_4_scaling_beta", rope_raw, "rope_parameters.")),
            # transformers' defaults where the file leaves a YaRN knob out
            beta_fast=float(rope_raw.get("beta_fast") or 32.0),
            beta_slow=float(rope_raw.get("beta_slow") or 1.0),
            mscale=rope_raw.get("mscale"),
            mscale_all_dim=rope_raw.get("mscale_all_dim"),
            attention_factor=rope_raw.get("attention_factor"),
            truncate=bool(rope_raw.get("truncate", True)),
        )

        eos = need("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        heads = int(need("num_attention_heads"))
        kv_heads = int(need("num_key_value_heads"))
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: 'num_attention_heads' ({heads}) is not a multiple of 'num_key_value_heads' ({kv_heads})"
            )
        config = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(need("head_dim")),
            max_position_embeddings=int(need("max_position_embeddings")),
            rms_norm_eps=float(need("rms_norm_eps")),
            rope=rope,
            mask_token_id=int(need("mask_token_id")),
            bos_token_id=int(need("bos_token_id")),
            eos_token_ids=eos_ids,
            block_size=int(need("block_size")),
            dtype=str(data.get("dtype") or data.get("torch_dtype") or "bfloat16"),
            raw=dict(data),
        )
        for name in ("mask_token_id", "bos_token_id"):
            if not 0 <= getattr(config, name) < config.vocab_size:
                raise ConfigError(f"config.json: '{name}' ({getattr(config, name)}) is outside the vocabulary")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The config.json content: the keys read, updated with this object's values."""
        data = dict(self.raw)
        rope = {k: v for k, v in asdict(self.rope).items() if v is not None}
        data.update(
            architectures=[ARCHITECTURE],
            model_type=MODEL_TYPE,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={**data.get("rope_parameters", {}), **rope},
            mask_token_id=self.mask_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            block_size=self.block_size,
            tie_word_embeddings=False,
            dtype=self.dtype,
        )
        return data

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
