"""Runtimes: one interface over the engine contract of DESIGN §4, whatever executes the denoiser.

A runtime owns the KV cache: `allocate` reserves one slot of `context` positions per live sequence, once.
`forward` gathers each row's cache (its first `cache_lengths[i]` positions), runs the pass and returns float32
logits; the keys and values of the pass stay inside the runtime until `commit` appends the first `counts[i]` new
columns of row i to its slot (speculative decoding keeps only the accepted prefix, a bidirectional pass nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CacheLayout":
        """From a checkpoint's config.json content."""
        return cls(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])


class Runtime(Protocol):
    layout: CacheLayout
    slots: int
    context: int

    def allocate(self, slots: int, context: int) -> None: ...

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
    ) -> np.ndarray: ...

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None: ...


def attention_mask(cache_lengths: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """`[B, P+T]` int64 key mask: a row's first `cache_lengths[i]` cached keys and its real new tokens."""
    p = int(cache_lengths.max(initial=0))
    cached = np.arange(p)[None, :] < cache_lengths[:, None]
    return np.concatenate([cached, new_mask.astype(bool)], axis=1).astype(np.int64)


class TorchRuntime:
    """Runs a PyTorch module with the engine contract (`forward(input_ids, position_ids, attention_mask,
    past_key_values, causal) -> (logits, present_key_values)`) on CPU or CUDA; the cache stays on that device."""

    def __init__(self, module: Any, layout: CacheLayout, device: str = "cpu", dtype: Any = None):
        import torch  # lazily: the serving environment may run another runtime without torch

        self._torch = torch
        self.module = module
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype or next(module.parameters()).dtype
        self.slots = 0
        self.context = 0
        self._cache: Any = None
        self._present: Any = None

    def allocate(self, slots: int, context: int) -> None:
        lay = self.layout
        shape = (slots, lay.num_layers, 2, lay.num_kv_heads, context, lay.head_dim)
        self._cache = self._torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.slots, self.context = slots, context

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
    ) -> np.ndarray:
        torch = self._torch
        p = int(cache_lengths.max(initial=0))
        index = torch.as_tensor(slots, device=self.device)
        with torch.inference_mode():
            logits, self._present = self.module(
                torch.as_tensor(input_ids, dtype=torch.int64, device=self.device),
                torch.as_tensor(position_ids, dtype=torch.int64, device=self.device),
                torch.as_tensor(attention_mask(cache_lengths, new_mask), device=self.device),
                self._cache[index, :, :, :, :p],
                torch.as_tensor(causal, dtype=torch.bool, device=self.device),
            )
        return logits.float().cpu().numpy()

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for row, (slot, start, count) in enumerate(zip(slots.tolist(), starts.tolist(), counts.tolist())):
            if count:
                self._cache[slot, :, :, :, start : start + count] = self._present[row, :, :, :, :count]
