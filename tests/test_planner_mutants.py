"""`dlm.planner` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the
limits' inclusive bounds, a profile's limits with a prefill chunk, the widest-first placement that keeps passes few,
and sequences that bring several rows to a pass."""

from __future__ import annotations

import itertools

import pytest

from dlm.contract import Profile
from dlm.planner import PassLimits, group_rows

LIMITS = PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16, token_budget=32)


def test_the_limits_bounds_are_inclusive() -> None:
    assert PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16, token_budget=16).token_budget == 16
    assert PassLimits(4, 24, 96, 16, 32, prefill_chunk=1).chunk == 1


def test_limits_from_a_profile_keep_the_prefill_chunk() -> None:
    profile = Profile.from_limits(block_size=8, max_batch=4, max_context=96, max_tokens=24, max_block=16)
    limits = PassLimits.from_profile(profile, prefill_chunk=8)
    assert (limits.max_batch, limits.max_tokens, limits.max_context, limits.max_block) == (4, 24, 96, 16)
    assert (limits.token_budget, limits.prefill_chunk, limits.chunk) == (24, 8, 8)  # budget: one longest prefill
    assert PassLimits.from_profile(profile, token_budget=48).token_budget == 48
    assert PassLimits.from_profile(profile).prefill_chunk is None


def test_rows_are_placed_widest_first_whatever_their_order() -> None:
    """Two 8-token rows and a 2-token one fit one pass only if the narrow row joins the two wide ones (alone beside
    one wide row it is too much padding): in any order of arrival, one pass."""
    sizes = [(8, 29), (2, 58), (8, 2)]
    for order in itertools.permutations(range(3)):
        arrived = [sizes[i] for i in order]
        groups = group_rows(arrived, LIMITS)
        assert len(groups) == 1 and sorted(groups[0]) == [0, 1, 2], (arrived, groups)


def test_a_sequence_with_several_rows_counts_them_all() -> None:
    """Re-masking's verifying rows: a sequence of 3 rows and one of 2 exceed a batch of 4 together."""
    groups = group_rows([(8, 0, 3), (8, 0, 2)], LIMITS)
    assert sorted(map(sorted, groups)) == [[0], [1]]
    assert group_rows([(8, 0, 2), (8, 0, 2)], LIMITS) == [[0, 1]]
    with pytest.raises(ValueError, match=r"5 row\(s\) of 8 tokens after 0 cached positions cannot run in any pass"):
        group_rows([(8, 0, 5)], PassLimits(max_batch=4, max_tokens=24, max_context=96, max_block=16,
                                           token_budget=64))


def test_a_pass_fills_each_limit_exactly() -> None:
    assert group_rows([(8, 0)] * 4, LIMITS) == [[0, 1, 2, 3]]  # 4 rows of the batch, 32 tokens of the budget
    assert group_rows([(8, 88), (8, 0)], LIMITS) == [[0, 1]]  # 88 cached + 8 = the 96 positions of the context
    assert group_rows([(8, 0), (4, 0)], LIMITS) == [[0, 1]]  # 12 real tokens of 16: exactly a quarter padding


def test_rows_that_fit_alone_but_not_together_go_in_separate_passes() -> None:
    # only the context parts them: 85 cached + 16 wide > 96 (2 x 16 is the budget, 24 of 32 real)
    assert sorted(map(sorted, group_rows([(8, 85), (16, 0)], LIMITS))) == [[0], [1]]


def test_the_real_tokens_a_sequence_declares_decide_the_padding() -> None:
    """A sequence's rows may be shorter than its widest: 2 real tokens beside 8 is too much padding for one pass,
    8 + 2 real of 16 is not enough either, 8 + 8 is."""
    assert sorted(map(sorted, group_rows([(8, 0, 1, 0, 2), (8, 0, 1, 0, 8)], LIMITS))) == [[0], [1]]
    assert group_rows([(8, 0, 1, 0, 8), (8, 0, 1, 0, 8)], LIMITS) == [[0, 1]]


def test_a_row_given_without_its_kind_is_kind_0() -> None:
    assert group_rows([(16, 0, 1, 0), (16, 20)], LIMITS) == [[0, 1]]
    assert sorted(map(sorted, group_rows([(16, 0, 1, 1), (16, 20)], LIMITS))) == [[0], [1]]


@pytest.mark.parametrize("size, why", [
    ((25, 0), "25 tokens: more than the artifact's 24"),
    ((8, 89), "89 cached + 8 > the context of 96"),
    ((24, 0, 2), "2 rows of 24: 48 tokens, more than the budget of 32"),
])
def test_a_single_sequence_beyond_one_limit_is_refused_naming_it(size: tuple[int, ...], why: str) -> None:
    k = size[2] if len(size) > 2 else 1
    with pytest.raises(ValueError) as raised:
        group_rows([size], LIMITS)
    assert str(raised.value) == (f"{k} row(s) of {size[0]} tokens after {size[1]} cached positions cannot run in "
                                 f"any pass of {LIMITS}"), why


def test_a_single_sequence_at_each_limit_runs() -> None:
    assert group_rows([(24, 72)], LIMITS) == [[0]]  # the artifact's tokens and, with the cache, the context
    assert group_rows([(8, 0, 4)], LIMITS) == [[0]]  # 4 rows: the batch, and 32 tokens: the budget
