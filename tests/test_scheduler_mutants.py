"""`dlm.scheduler` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the
bounds a scheduler is built with, and its refusals word for word."""

from __future__ import annotations

from typing import Any

import pytest

from dlm.refine import TokenSpec
from dlm.scheduler import Scheduler

SPEC = TokenSpec(mask_token_id=0, eos_token_ids=frozenset({1}), block_size=8, max_position_embeddings=4096)


class IdleRuntime:
    """A runtime that only records its allocation (no request is ever run on it)."""

    profile = None

    def __init__(self) -> None:
        self.allocated: tuple[Any, ...] = ()

    def allocate(self, slots: int, context: int, token_budget: int | None = None) -> None:
        self.allocated = (slots, context, token_budget)

    def claim(self, free: list[int], prompt: list[int] | None) -> tuple[int, int]:
        return free[-1], 0

    def retain(self, slot: int, tokens: Any) -> None:
        pass


@pytest.mark.parametrize("max_live, max_queue", [(0, 4), (2, -1)])
def test_bounds_below_one_slot_or_a_negative_queue_are_refused(max_live: int, max_queue: int) -> None:
    with pytest.raises(ValueError) as raised:
        Scheduler(IdleRuntime(), SPEC, max_live=max_live, max_queue=max_queue, context=64)  # type: ignore[arg-type]
    assert str(raised.value) == f"max_live must be >= 1 and max_queue >= 0, got {max_live} and {max_queue}"


def test_one_slot_and_no_queue_are_enough() -> None:
    runtime = IdleRuntime()
    scheduler = Scheduler(runtime, SPEC, max_live=1, max_queue=0, context=64)  # type: ignore[arg-type]
    try:
        assert runtime.allocated == (1, 64, None) and (scheduler.live, scheduler.waiting) == (0, 0)
    finally:
        scheduler.stop()
    assert not scheduler._thread.is_alive()  # stop joined the scheduler's thread
