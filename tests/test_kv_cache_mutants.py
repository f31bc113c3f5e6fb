"""`dlm.kv_cache` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the
index's edges (no free slot, content longer than a slot, an empty release, forgetting), ties between equal matches,
and the shortest shared part worth a copy."""

from __future__ import annotations

import numpy as np
import pytest

from dlm.kv_cache import MIN_COPY, KVCache


def cache(slots: int = 4, context: int = 64) -> KVCache:
    kv = KVCache(np.zeros((slots, 1, 2, 1, context, 1), np.float32))
    kv.cache[:] = np.arange(slots)[:, None, None, None, None, None]  # each slot's positions hold its number
    return kv


def test_the_cache_shape_gives_slots_and_context() -> None:
    kv = cache(slots=3, context=40)
    assert (kv.slots, kv.context, kv.resident) == (3, 40, {})


def test_no_free_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="^no free slot to claim$"):
        cache().claim([], [1, 2, 3])


def test_a_release_keeps_at_most_a_slot_of_tokens_and_an_empty_one_nothing() -> None:
    kv = cache(context=64)
    kv.retain(0, list(range(100)))
    assert kv.resident[0].tolist() == list(range(64))
    kv.retain(0, [])
    assert 0 not in kv.resident


def test_forget_one_slot_or_all() -> None:
    kv = cache()
    for slot in range(3):
        kv.retain(slot, [slot + 1] * 20)
    kv.forget(1)
    assert set(kv.resident) == {0, 2}
    kv.forget()
    assert kv.resident == {}


def test_equal_matches_go_to_the_most_recently_released_slot() -> None:
    kv = cache()
    prompt = [1] * 30 + [2, 3]
    kv.retain(2, [1] * 30 + [9])
    kv.retain(0, [1] * 30 + [8])  # released later: preferred among equals
    assert kv.claim([0, 1, 2, 3], prompt) == (1, 30)  # branches off inside both: an empty slot, a copy
    assert (kv.cache[1, ..., :30, :] == 0).all() and (kv.cache[1, ..., 30:, :] == 1).all()


@pytest.mark.parametrize("shared, copied", [(MIN_COPY, True), (MIN_COPY - 1, False)])
def test_a_shared_part_is_copied_from_min_copy_tokens(shared: int, copied: bool) -> None:
    kv = cache()
    kv.retain(0, list(range(10, 10 + shared)) + [99])
    slot, reused = kv.claim([0, 1], list(range(10, 10 + shared)) + [5, 6])
    assert slot == 1 and reused == (shared if copied else 0)
    assert (kv.cache[1, ..., :shared, :] == 0).all() == copied


def test_forgetting_a_slot_with_nothing_resident_is_a_no_op() -> None:
    kv = cache()
    kv.retain(0, [1] * 20)
    kv.forget(3)
    assert list(kv.resident) == [0]


def test_a_one_token_content_that_begins_the_prompt_is_taken_over() -> None:
    kv = cache()
    kv.retain(0, [7])
    assert kv.claim([0, 1], [7, 8]) == (0, 1)  # slot 1 is empty, but slot 0's one token is the prompt's first


def test_equal_one_token_matches_go_to_the_most_recently_released_slot() -> None:
    kv = cache()
    kv.retain(0, [7])
    kv.retain(2, [7])  # released later, and later among the free slots: preferred among equals all the same
    assert kv.claim([0, 1, 2, 3], [7, 8]) == (2, 1)


def test_with_no_empty_slot_the_least_recently_released_is_evicted() -> None:
    kv = cache(slots=3)
    kv.retain(2, [7] * 20)
    kv.retain(1, [8] * 20)
    kv.retain(0, [9] * 20)  # 2 was released first, then 1, then 0
    assert kv.claim([0, 1, 2], [5, 6, 7]) == (2, 0)  # nothing shared: the least recent goes
    assert set(kv.resident) == {0, 1}
    kv.retain(2, [6] * 20)  # now 1 is the least recent
    assert kv.claim([0, 1, 2], [5, 6, 7]) == (1, 0)
