"""The denoiser: the Ministral-3 decoder of the Nemotron-Labs Diffusion family, both attention modes in one forward.

`forward` is the engine contract, version 2 (DESIGN §4): it reads a KV cache `past_key_values [B, L, 2, KV, P, D]`,
runs the `T` new tokens causally or bidirectionally (chosen per row by `causal`), and returns, at the `N` positions
`logit_positions` names, the `top_k` best candidates (ids and float32 logits, the mask id excluded) and the
log-sum-exp over the whole vocabulary, plus the keys (after RoPE) and values of the new tokens only; the caller owns
the cache and writes them into it. No full-vocabulary tensor leaves the graph. `forward_with_mask` returns the full
logits, for training and for comparisons with transformers.
With a draft-only LoRA attached (`attach_draft_adapter`, the checkpoint's `linear_spec_lora/`), `forward` takes one
more input, `draft [B]`: rows where it is true run `o_proj(x) + scale · B(A(x))` in every layer, the others the base
weights, so self-speculation's drafting rows and every other row share one graph, one pass and one copy of the
weights.
Parameter names follow the checkpoint (`encoder.*`, `diffusion_head`), so a real state dict loads unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from export.config import ModelConfig

# Additive mask value for disallowed keys: large enough to zero a softmax, small enough for fp16 (max 65504).
MASK_FILL = -3.0e4
# The mask id's logit in the selection (float32): never among the candidates, exp() of it is exactly 0.
EXCLUDED_LOGIT = -1.0e30
DEFAULT_TOP_K = 64


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def yarn_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and the cos/sin attention factor, computed as transformers computes them."""
    rope, dim = config.rope, config.head_dim

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.rope_theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = rope.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [B, N, vocab], 1.0 where `bitmask [B, N, W]` (int32, llguidance's and xgrammar's layout: bit j of
    word w is token 32·w + j) allows the token. Exact integer ops only, as TensorRT's ONNX parser takes them
    (compare, multiply, add, subtract; no BitShift or BitwiseAnd, and no integer division, which the exporter
    lowers through float32 and so rounds above 2^24): the sign bit (bit 31) is `word < 0`; the word made
    non-negative by adding 2^31 (in two steps of 2^30) gives bits 30 down to 0 by comparing the remainder with each
    power of two. The steps run over [B, N, W], the words, not the vocabulary."""
    negative = (bitmask < 0).to(torch.int32)
    rest = bitmask + negative * (1 << 30) + negative * (1 << 30)  # in [0, 2^31): bits 0..30 unchanged
    bits = [negative]
    for j in range(30, -1, -1):
        bit = (rest >= (1 << j)).to(torch.int32)
        rest = rest - bit * (1 << j)
        bits.append(bit)
    flat = torch.stack(bits[::-1], dim=-1).reshape(bitmask.shape[0], bitmask.shape[1], bitmask.shape[2] * 32)
    return flat[..., :vocab].to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DraftLoRA(nn.Module):
    """The draft-only LoRA of one o_proj: B(A(x)), unscaled (the caller scales it per row or per token)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))


class Attention(nn.Module):
    """GQA attention. Each KV head serves `group` query heads; the group is folded into the query axis
    ([B, KV, group·T, D] against [B, KV, S, D]), so keys and values are never copied per query head.
    `fold_query_groups=False` expands them instead (the former graph, kept to measure the difference)."""

    def __init__(self, config: ModelConfig, fold_query_groups: bool = True):
        super().__init__()
        self.fold_query_groups = fold_query_groups
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.draft_lora: DraftLoRA | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_scale: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        bias: torch.Tensor,
        draft_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`draft_scale` ([B, 1, 1] or [B, T, 1], the LoRA's alpha / r where it applies, 0 elsewhere) switches the
        draft-only LoRA on per row or per token."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = q * query_scale
        keys = torch.cat((past_k, k), dim=2)
        values = torch.cat((past_v, v), dim=2)
        group = self.heads // self.kv_heads
        s = keys.shape[2]
        scale = self.head_dim**-0.5
        if self.fold_query_groups:  # query head h = kv · group + j attends with KV head kv; a broadcast matmul
            q5 = q.reshape(b, self.kv_heads, group, t, self.head_dim)
            out = attention(q5, keys[:, :, None], values[:, :, None], bias[:, :, None], scale)
        else:
            if group > 1:
                keys = keys[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(b, self.heads, s, -1)
                values = values[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(
                    b, self.heads, s, -1)
            out = attention(q, keys, values, bias, scale)
        out = out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        projected = self.o_proj(out)
        if self.draft_lora is not None and draft_scale is not None:
            projected = projected + draft_scale * self.draft_lora(out)
        return projected, k, v


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v over the last two axes (the others broadcast), the scores and the softmax in
    float32 whatever the model's dtype (bf16 scores of 100 would be rounded to 0.5, and the softmax of long rows
    loses too much in fp16), the weighted sum in the model's dtype."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale + bias.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, fold_query_groups: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, fold_query_groups)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig, fold_query_groups: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, fold_query_groups) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DiffusionLM(nn.Module):
    """Nemotron-Labs Diffusion denoiser. Causal rows give shifted logits (i predicts i+1), bidirectional rows
    unshifted ones (i predicts i)."""

    inv_freq: torch.Tensor  # a buffer (see __init__)

    def __init__(self, config: ModelConfig, top_k: int = DEFAULT_TOP_K, fold_query_groups: bool = True):
        super().__init__()
        self.config = config
        self.top_k = top_k  # candidates per position that `forward` returns
        self.structured = False  # exported with token_bitmask (engine contract version 3); forward takes it anyway
        self.encoder = Encoder(config, fold_query_groups)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, attention_factor = yarn_inverse_frequencies(config)
        # A buffer, so it follows the model's device, but never its dtype: `_apply` below keeps it float32
        # (in bf16 the RoPE frequencies of the far dimensions would lose their precision).
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self.draft_adapter: Any = None  # the attached `export.adapter.DraftAdapter`, if any

    @property
    def has_draft_adapter(self) -> bool:
        return self.draft_adapter is not None

    def attach_draft_adapter(self, adapter: Any) -> None:
        """Add the draft-only LoRA (`export.adapter.DraftAdapter`) to every layer's o_proj, in the model's dtype."""
        for layer, a, b in zip(self.encoder.layers, adapter.lora_a, adapter.lora_b):
            assert isinstance(layer, DecoderLayer)  # for the type checker: nn.ModuleList yields nn.Module
            attn = layer.self_attn
            lora = DraftLoRA(a.shape[1], b.shape[0], adapter.rank).to(device=a.device, dtype=self.dtype)
            with torch.no_grad():
                lora.lora_A.weight.copy_(a)
                lora.lora_B.weight.copy_(b)
            attn.draft_lora = lora
        self.draft_adapter = adapter

    def draft_loras(self) -> list[DraftLoRA]:
        """The attached draft-only LoRA of every layer, in order (empty without an adapter)."""
        loras = []
        for layer in self.encoder.layers:
            assert isinstance(layer, DecoderLayer)
            if layer.self_attn.draft_lora is not None:
                loras.append(layer.self_attn.draft_lora)
        return loras

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: the state dict without an attached draft adapter."""
        return {k: v for k, v in self.state_dict().items() if ".draft_lora." not in k}

    def draft_scale(self, draft: torch.Tensor | None) -> torch.Tensor | None:
        """[B, 1, 1] (from `draft [B]`) or [B, T, 1] (from `draft [B, T]`): alpha / r where the LoRA applies."""
        if self.draft_adapter is None or draft is None:
            return None
        scale = draft.to(self.dtype) * self.draft_adapter.scale
        return scale[:, None, None] if scale.dim() == 1 else scale[:, :, None]

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        inv_freq, _ = yarn_inverse_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def empty_cache(self, batch: int) -> torch.Tensor:
        c = self.config
        return torch.zeros(batch, c.num_hidden_layers, 2, c.num_key_value_heads, 0, c.head_dim, dtype=self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: torch.Tensor,
        causal: torch.Tensor,
        logit_positions: torch.Tensor,
        draft: torch.Tensor | None = None,
        token_bitmask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The engine contract: (top_tokens [B, N, K], top_logits [B, N, K], logsumexp [B, N], present).
        `draft [B]`: the rows that run the draft-only LoRA (only with an adapter attached). `token_bitmask
        [B, N, ceil(V/32)]` int32 (contract version 3, graphs exported with `--structured`): bit j of word w set
        allows token 32·w + j at that position; a token not allowed is excluded from the top-K and the
        log-sum-exp as the mask id is (its candidates, when fewer than K are allowed, carry `EXCLUDED_LOGIT`)."""
        hidden, present = self.contract_hidden_states(
            input_ids, position_ids, attention_mask, past_key_values, causal, draft)
        # only the requested positions reach the head: [B, N, H], then [B, N, V] logits that never leave the graph
        index = logit_positions[:, :, None].expand(-1, -1, hidden.shape[-1])
        logits = self.head(torch.gather(hidden, 1, index))
        logits = logits + self.excluded_bias(logits)
        if token_bitmask is not None:
            logits = logits + (1.0 - unpack_bitmask(token_bitmask, logits.shape[-1])) * EXCLUDED_LOGIT
        top_logits, top_tokens = torch.topk(logits, self.top_k, dim=-1)
        return top_tokens, top_logits, torch.logsumexp(logits, dim=-1), present

    def full_logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: torch.Tensor,
        causal: torch.Tensor,
        draft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The contract's inputs (without `logit_positions`), but float32 logits [B, T, V] at every position and
        the mask id included: for tests and tools that compare with other implementations, never exported."""
        hidden, present = self.contract_hidden_states(
            input_ids, position_ids, attention_mask, past_key_values, causal, draft)
        return self.head(hidden), present

    def contract_hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: torch.Tensor,
        causal: torch.Tensor,
        draft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` under the contract's key mask (padding, and causal or bidirectional per row)."""
        allowed = self.key_mask(input_ids, attention_mask, past_key_values, causal)
        return self.hidden_states(input_ids, position_ids, allowed, past_key_values, self.draft_scale(draft))

    @staticmethod
    def key_mask(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: torch.Tensor, causal: torch.Tensor
    ) -> torch.Tensor:
        """`allowed [B, T, P+T]`: every real cached key, and the new keys causally or all of them per row."""
        t = input_ids.shape[1]
        p = past_key_values.shape[4]
        idx = torch.arange(t, device=input_ids.device)
        lower = idx[None, :] <= idx[:, None]  # [T, T] causal pattern over the new tokens
        # bidirectional rows allow every new key; logic ops rather than a bool Where, which ONNX Runtime lacks on CPU
        new = lower | ~causal.reshape(-1, 1, 1)  # [B or 1, T, T]
        new = new.expand(input_ids.shape[0], t, t)
        cached = torch.ones(input_ids.shape[0], t, p, dtype=torch.bool, device=input_ids.device)
        return torch.cat((cached, new), dim=-1) & attention_mask.bool()[:, None, :]

    def excluded_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """[V] float32: 0 everywhere but the mask id, which is pushed below every real logit."""
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        return (vocab == self.config.mask_token_id).to(torch.float32) * EXCLUDED_LOGIT

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and the diffusion head, float32 logits."""
        return self.diffusion_head(self.encoder.norm(hidden)).float()

    def forward_with_mask(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        allowed: torch.Tensor,
        past_key_values: torch.Tensor | None = None,
        draft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full logits [B, T, V] and present with an explicit `allowed [B, T, P+T]` key mask (training uses the
        block-causal one); `draft [B, T]` switches the draft-only LoRA on per token (training the adapter)."""
        hidden, present = self.hidden_states(input_ids, position_ids, allowed, past_key_values, self.draft_scale(draft))
        return self.head(hidden), present

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        allowed: torch.Tensor,
        past_key_values: torch.Tensor | None = None,
        draft_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states [B, T, H] (before the final norm) and the new keys and values."""
        if past_key_values is None:
            past_key_values = self.empty_cache(input_ids.shape[0]).to(input_ids.device)
        dtype = self.dtype
        pos = position_ids.float()
        freqs = pos[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)[:, None]
        sin = (emb.sin() * self.attention_factor).to(dtype)[:, None]
        rope = self.config.rope
        query_scale = 1 + rope.llama_4_scaling_beta * torch.log(
            1 + torch.floor(pos / rope.original_max_position_embeddings)
        )
        query_scale = query_scale[:, None, :, None].to(dtype)
        bias = torch.where(allowed, 0.0, MASK_FILL).to(dtype)[:, None]  # [B, 1, T, P+T]

        x = self.encoder.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.encoder.layers):
            assert isinstance(layer, DecoderLayer)  # for the type checker: nn.ModuleList yields nn.Module
            attn, k, v = layer.self_attn(
                layer.input_layernorm(x),
                cos,
                sin,
                query_scale,
                past_key_values[:, i, 0],
                past_key_values[:, i, 1],
                bias,
                draft_scale,
            )
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            presents.append(torch.stack((k, v), dim=1))  # [B, 2, KV, T, D]
        return x, torch.stack(presents, dim=1)


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint, name → shape: 3 + 9 × layers entries."""
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embed_tokens.weight": (config.vocab_size, h),
        "encoder.norm.weight": (h,),
        "diffusion_head.weight": (config.vocab_size, h),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        }
    return shapes
