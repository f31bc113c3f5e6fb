"""The KV-cache bookkeeping every runtime shares: one slot of `context` positions per live sequence, the gather of
each row's cached prefix into a pass's `past_key_values`, and the commit of a pass's new columns into the slots.

The same code serves numpy arrays (ONNX Runtime) and torch tensors (PyTorch, TensorRT): both index and assign
`cache[slot, :, :, :, a:b]` alike, so the copies are written once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class KVCache:
    """`cache [slots, L, 2, KV, context, D]`, a numpy array or a torch tensor, allocated once by the runtime."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.slots, self.context = int(cache.shape[0]), int(cache.shape[4])

    def gather(self, slots: np.ndarray, length: int, past: Any) -> None:
        """Copy the first `length` cached positions of each row's slot into `past [B, L, 2, KV, length, D]`.
        Positions beyond a shorter row's own cache length are masked out by the pass's attention mask."""
        for row, slot in enumerate(slots.tolist()):
            past[row] = self.cache[slot, :, :, :, :length]

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray, present: Any) -> None:
        """Append the first `counts[i]` new columns of `present [B, L, 2, KV, T, D]` to row i's slot at
        `starts[i]` (speculative decoding keeps only the accepted prefix, a bidirectional pass nothing)."""
        for row, (slot, start, count) in enumerate(zip(slots.tolist(), starts.tolist(), counts.tolist())):
            if count:
                self.cache[slot, :, :, :, start : start + count] = present[row, :, :, :, :count]
