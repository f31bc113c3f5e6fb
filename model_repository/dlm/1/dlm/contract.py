"""The engine contract of DESIGN §4 as one object: tensor names, dtypes, dynamic axes and the optimization profile.

Export traces with these names and axes, the TensorRT build takes its profile from here, and every runtime binds
the same names and refuses shapes outside the same profile, so the three cannot disagree (the idea of TensorRT's
demo/Diffusion). The contract travels in each artifact's manifest, so the serving side rebuilds it without `export`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Version 2: the graph selects candidates itself (top_tokens, top_logits, logsumexp) at the positions asked for;
# version 1 returned full-vocabulary logits for every position and is refused at load. Version 3 (DESIGN §4a,
# graphs exported with `--structured`): version 2 plus `token_bitmask [B, N, ceil(V/32)]` int32, the allowed tokens
# at each position, applied before the top-K and the log-sum-exp. Both are served.
CONTRACT_VERSION = 3
SERVED_VERSIONS = (2, 3)
BITS_PER_WORD = 32
# Dynamic axes, by the names they carry in the ONNX graph. P+T and N have their own axes (DESIGN §4).
BATCH, TOKENS, PAST, PAST_PLUS_TOKENS, POSITIONS = "batch", "tokens", "past", "past_plus_tokens", "positions"
AXES = (BATCH, TOKENS, PAST, PAST_PLUS_TOKENS, POSITIONS)
CACHE_DTYPE = "cache"  # placeholder dtype: the model's dtype (float32 or float16)
DEFAULT_TOP_K = 64  # candidates per position; at least 20, so OpenAI's top_logprobs <= 20 can be served
MIN_TOP_K = 20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, or CACHE_DTYPE
    dims: tuple[int | str, ...]  # a str is a dynamic axis, an int a fixed size


@dataclass(frozen=True)
class Profile:
    """min / opt / max of each dynamic axis. `past_plus_tokens` is consistent with the others at each point;
    `positions` (N, the positions a pass predicts from) is bounded by the longest block a request may use."""

    batch: tuple[int, int, int]
    tokens: tuple[int, int, int]
    past: tuple[int, int, int]
    past_plus_tokens: tuple[int, int, int]
    positions: tuple[int, int, int]

    @classmethod
    def from_limits(
        cls, block_size: int, max_batch: int, max_context: int, max_tokens: int | None = None,
        max_block: int | None = None,
    ) -> "Profile":
        """Ranges from the model's block size and the serving limits: at most `max_batch` rows per pass, at most
        `max_context` positions per sequence (prompt + answer + one block), at most `max_tokens` new tokens per pass
        (the longest prompt prefill; default all of `max_context`), blocks of at most `max_block` positions
        (default twice the model's block size). The opt point is a denoising pass over one block at half the
        context, the pass the decoding loop runs most."""
        max_tokens = max_context if max_tokens is None else max_tokens
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not block_size < max_context:
            raise ValueError(f"max_context ({max_context}) must exceed the block size ({block_size})")
        if not 1 <= max_tokens <= max_context:
            raise ValueError(f"max_tokens must be in [1, max_context={max_context}], got {max_tokens}")
        max_block = min(2 * block_size, max_tokens) if max_block is None else max_block
        if not 2 <= max_block <= max_tokens:
            raise ValueError(f"max_block must be in [2, max_tokens={max_tokens}], got {max_block}")
        opt_tokens = min(block_size, max_tokens)
        opt_past = min(max_context // 2, max_context - opt_tokens)
        return cls(
            batch=(1, max(1, max_batch // 2), max_batch),
            tokens=(1, opt_tokens, max_tokens),
            past=(0, opt_past, max_context - 1),
            past_plus_tokens=(1, opt_past + opt_tokens, max_context),
            positions=(1, min(block_size, max_block), max_block),
        )

    @property
    def max_block(self) -> int:
        """The longest block a pass may carry (a denoising pass predicts from every position of its block)."""
        return self.positions[2]

    @property
    def max_context(self) -> int:
        return self.past_plus_tokens[2]

    def axis(self, name: str) -> tuple[int, int, int]:
        return getattr(self, name)

    def check(self, batch: int, tokens: int, past: int, positions: int = 1) -> None:
        """Refuse a pass the artifact was not built for, naming the axis, its range and the build option."""
        for name, value, option in (
            (BATCH, batch, "--max-batch"),
            (TOKENS, tokens, "--max-tokens"),
            (PAST, past, "--max-context"),
            (PAST_PLUS_TOKENS, past + tokens, "--max-context"),
            (POSITIONS, positions, "--max-block"),
        ):
            low, _, high = self.axis(name)
            if not low <= value <= high:
                raise ValueError(
                    f"{name} = {value} is outside the range [{low}, {high}] this artifact was built for; "
                    f"rebuild it with a larger {option}"
                )

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        def span(values: list[int]) -> tuple[int, int, int]:
            low, opt, high = (int(x) for x in values)
            return low, opt, high

        return cls(**{k: span(data[k]) for k in AXES})


@dataclass(frozen=True)
class EngineContract:
    """The denoiser's inputs and outputs for one model and cache dtype, plus the profile it is built for, the
    number of candidates `top_k` (K) it returns per requested position, and whether the graph carries a draft-only
    LoRA (`draft_adapter`: then it takes one more input, `draft [B]`, the rows the LoRA applies to)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    cache_dtype: str  # "float32" or "float16"
    profile: Profile
    top_k: int = DEFAULT_TOP_K
    draft_adapter: bool = False
    structured: bool = False  # version 3: the graph takes `token_bitmask`

    @property
    def version(self) -> int:
        return 3 if self.structured else 2

    @property
    def bitmask_words(self) -> int:
        """W = ceil(V / 32): the int32 words of one position's allowed-token bitmask."""
        return -(-self.vocab_size // BITS_PER_WORD)

    def __post_init__(self) -> None:
        if not MIN_TOP_K <= self.top_k < self.vocab_size:
            raise ValueError(
                f"top_k must be in [{MIN_TOP_K}, vocab_size - 1 = {self.vocab_size - 1}] (the mask id is never a "
                f"candidate), got {self.top_k}"
            )

    @classmethod
    def from_config(
        cls, config: dict[str, Any], cache_dtype: str, profile: Profile, top_k: int = DEFAULT_TOP_K,
        draft_adapter: bool = False, structured: bool = False,
    ) -> "EngineContract":
        """From a checkpoint's config.json content."""
        return cls(
            int(config["num_hidden_layers"]),
            int(config["num_key_value_heads"]),
            int(config["head_dim"]),
            int(config["vocab_size"]),
            cache_dtype,
            profile,
            top_k,
            draft_adapter,
            structured,
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        cache = (BATCH, self.num_layers, 2, self.num_kv_heads, PAST, self.head_dim)
        draft = (TensorSpec("draft", "bool", (BATCH,)),) if self.draft_adapter else ()
        bitmask = (TensorSpec("token_bitmask", "int32", (BATCH, POSITIONS, self.bitmask_words)),) \
            if self.structured else ()
        return (
            TensorSpec("input_ids", "int64", (BATCH, TOKENS)),
            TensorSpec("position_ids", "int64", (BATCH, TOKENS)),
            TensorSpec("attention_mask", "int64", (BATCH, PAST_PLUS_TOKENS)),
            TensorSpec("past_key_values", CACHE_DTYPE, cache),
            TensorSpec("causal", "bool", (BATCH,)),
            TensorSpec("logit_positions", "int64", (BATCH, POSITIONS)),
            *draft,
            *bitmask,
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        present = (BATCH, self.num_layers, 2, self.num_kv_heads, TOKENS, self.head_dim)
        return (
            TensorSpec("top_tokens", "int64", (BATCH, POSITIONS, self.top_k)),
            TensorSpec("top_logits", "float32", (BATCH, POSITIONS, self.top_k)),
            TensorSpec("logsumexp", "float32", (BATCH, POSITIONS)),
            TensorSpec("present_key_values", CACHE_DTYPE, present),
        )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dtype(self, spec: TensorSpec) -> str:
        return self.cache_dtype if spec.dtype == CACHE_DTYPE else spec.dtype

    def shape(self, spec: TensorSpec, batch: int, tokens: int, past: int, positions: int = 1) -> tuple[int, ...]:
        sizes = {BATCH: batch, TOKENS: tokens, PAST: past, PAST_PLUS_TOKENS: past + tokens, POSITIONS: positions}
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec.dims)

    def shape_of(self, name: str, batch: int, tokens: int, past: int, positions: int = 1) -> tuple[int, ...]:
        spec = next(s for s in (*self.inputs, *self.outputs) if s.name == name)
        return self.shape(spec, batch, tokens, past, positions)

    def buffer_elements(self, spec: TensorSpec, rows: int, context: int, pass_tokens: int) -> int:
        """Elements of the largest `spec` tensor of any pass with at most `rows` rows, `context` positions of
        cache plus new tokens per row, and `pass_tokens` new tokens in all (B × T, padding included; a pass never
        predicts from more positions than it has tokens): what one buffer for that tensor must hold."""
        fixed = math.prod(d for d in spec.dims if isinstance(d, int))
        if PAST in spec.dims or PAST_PLUS_TOKENS in spec.dims:
            return rows * context * fixed
        if POSITIONS in spec.dims:
            return min(pass_tokens, rows * self.profile.max_block) * fixed
        if TOKENS in spec.dims:
            return pass_tokens * fixed
        return rows * fixed

    def output_bytes(self, batch: int, tokens: int, past: int, positions: int) -> dict[str, int]:
        """Bytes of each output of one pass of this shape (what the engine hands back)."""
        sizes = {}
        for spec in self.outputs:
            itemsize = np.dtype(self.dtype(spec)).itemsize
            sizes[spec.name] = math.prod(self.shape(spec, batch, tokens, past, positions)) * itemsize
        return sizes

    def profile_shapes(self, spec: TensorSpec) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shape of one input, as TensorRT's `IOptimizationProfile.set_shape` takes them."""
        return tuple(
            tuple(self.profile.axis(d)[i] if isinstance(d, str) else d for d in spec.dims) for i in range(3)
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = self.profile.to_dict()
        data["version"] = self.version
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineContract":
        """Raises `OldContract` for an artifact built for another version of the contract."""
        version = int(data.get("version", 1))
        if version not in SERVED_VERSIONS:
            raise OldContract(version)
        return cls(
            int(data["num_layers"]),
            int(data["num_kv_heads"]),
            int(data["head_dim"]),
            int(data["vocab_size"]),
            str(data["cache_dtype"]),
            Profile.from_dict(data["profile"]),
            int(data["top_k"]),
            bool(data.get("draft_adapter", False)),  # absent in artifacts built before adapters were supported
            version == 3,
        )


class OldContract(ValueError):
    """An artifact built for another version of the engine contract (version 1: full-vocabulary logits)."""

    def __init__(self, version: int):
        super().__init__(
            f"it was built for engine contract version {version}, this code runs versions "
            f"{' and '.join(map(str, SERVED_VERSIONS))} (candidates selected inside the graph, no full-vocabulary "
            f"logits)"
        )
        self.version = version
