"""The KV-cache bookkeeping every runtime shares: one slot of `context` positions per live sequence, the gather of
each row's cached prefix into a pass's `past_key_values`, the commit of a pass's new columns into the slots, and
the prefix index that lets a request reuse what a finished one left in its slot.

The same code serves numpy arrays (ONNX Runtime) and torch tensors (PyTorch, TensorRT): both index and assign
`cache[slot, :, :, :, a:b]` alike, so the copies are written once.

Prefix caching: a request that leaves (finished, stopped or cancelled) leaves its slot's keys and values resident,
indexed by the tokens they were computed from, and a new request starts its prefill after the part of its prompt
that some free slot holds. Only causal passes ever write the cache (a bidirectional pass commits nothing), and the
key and value at position i of a causal pass depend only on the tokens at positions 0..i, so a shared prefix's keys
and values are what the new request's own prefill would write. Which slot it takes:

- the slot with the longest match, when everything that slot holds is a prefix of the prompt (the conversation's
  earlier turn, the same system prompt): taken over as it is, no copy, nothing evicted;
- otherwise an empty slot, else the least recently released one (LRU eviction); when the prompt branches off inside
  another slot's content (a shared system prompt, then another user's turn), the shared part is copied from that
  slot, which keeps its content for the conversation it belongs to.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# shortest shared part worth copying into another slot: below it (a shared BOS, a few template tokens) the request
# takes an empty or the least recently used slot and reuses only what that one holds
MIN_COPY = 16


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class KVCache:
    """`cache [slots, L, 2, KV, context, D]`, a numpy array or a torch tensor, allocated once by the runtime."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.slots, self.context = int(cache.shape[0]), int(cache.shape[4])
        # free slots whose first positions hold keys and values of these tokens, and when each was released
        self.resident: dict[int, np.ndarray] = {}
        self._released: dict[int, int] = {}
        self._clock = 0
        self.weights: object = None  # the weights the resident content was computed with (`check_weights`)

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
                self.resident.pop(slot, None)  # written by a caller that did not claim it: its index is stale
                self.cache[slot, :, :, :, start : start + count] = present[row, :, :, :, :count]

    # --- prefix caching ----------------------------------------------------------------------------------------
    def claim(self, free: Sequence[int], prompt: Sequence[int] | None) -> tuple[int, int]:
        """One of the `free` slots for a request with this prompt, and how many of the prompt's first tokens its
        cache holds: at most all but the last, whose prediction seeds the answer and so must run. `prompt` None
        (prefix caching off): no lookup, no reuse. The slot's content leaves the index (it is the request's now)."""
        if not free:
            raise ValueError("no free slot to claim")
        whole = np.asarray(prompt if prompt is not None else [], dtype=np.int64)
        tokens = whole[:-1]
        source, shared = self._longest_match(free, tokens) if prompt is not None else (None, 0)
        if source is not None and shared_prefix(self.resident[source], whole) == len(self.resident[source]):
            slot = source  # all it holds begins the prompt (an earlier turn): take it over, nothing is lost
        else:
            empty = [s for s in free if s not in self.resident]
            slot = empty[0] if empty else min(free, key=lambda s: self._released[s])  # evict the least recent
            if source is not None and slot != source and shared >= MIN_COPY:
                # the prompt branches off inside that slot's content: copy the shared part, keep the original
                self.cache[slot, :, :, :, :shared] = self.cache[source, :, :, :, :shared]
            elif slot != source:
                content = self.resident.get(slot)
                shared = shared_prefix(content, tokens) if content is not None and prompt is not None else 0
        self.resident.pop(slot, None)
        return slot, shared

    def _longest_match(self, free: Sequence[int], tokens: np.ndarray) -> tuple[int | None, int]:
        """The free slot whose content shares the longest prefix with `tokens`, the most recently released among
        equals, and that length (None, 0: no content shares a token)."""
        best, shared = None, 0
        for slot in free:
            content = self.resident.get(slot)
            if content is None:
                continue
            n = shared_prefix(content, tokens)
            if n > shared or (n == shared > 0 and best is not None and self._released[slot] > self._released[best]):
                best, shared = slot, n
        return best, shared

    def retain(self, slot: int, tokens: Sequence[int]) -> None:
        """A request left `slot`, whose first `len(tokens)` positions hold the keys and values of `tokens`, all
        written by causal passes: keep them for the next request that shares a prefix."""
        self._clock += 1
        self._released[slot] = self._clock
        if len(tokens):
            self.resident[slot] = np.asarray(tokens, dtype=np.int64)[: self.context]
        else:
            self.resident.pop(slot, None)

    def forget(self, slot: int | None = None) -> None:
        """Drop one slot's resident content (its keys and values cannot be trusted), or all of it."""
        if slot is None:
            self.resident.clear()
        else:
            self.resident.pop(slot, None)

    def check_weights(self, weights: object) -> None:
        """Content computed with other weights (a module changed in place) is never served: drop it."""
        if weights != self.weights:
            self.resident.clear()
            self.weights = weights
