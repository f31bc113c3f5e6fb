"""`dlm.candidates` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the
distribution `sample` draws from (softmax of logits / temperature over the candidates left by top_k and top_p), the
cuts' exact edges, top_p with logits too large or too far apart for a plain exp, and `Picks.subset`.

Each distribution is checked on 40 000 identical rows drawn in one call (a fixed seed): a frequency's standard error
is at most 0.0025, and the tolerance is 0.015."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dlm.candidates import Candidates, Picks, pick, sample

N = 40_000


@dataclass(frozen=True)
class Params:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def frequencies(logits: list[float], params: Params, seed: int = 0) -> np.ndarray:
    rows = np.tile(np.array(logits, dtype=np.float32), (N, 1))
    chosen = sample(rows, params, np.random.default_rng(seed))
    return np.bincount(chosen, minlength=len(logits)) / N


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_samples_follow_the_softmax_at_the_temperature(temperature: float) -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    np.testing.assert_allclose(frequencies(logits.tolist(), Params(temperature)), softmax(logits / temperature),
                               atol=0.015)


def test_top_k_keeps_the_k_best_candidates_still_allowed() -> None:
    logits = [-np.inf, 0.0, -0.5, -1.0]  # the first excluded by the caller (an end token not allowed yet)
    want = softmax(np.array([-np.inf, 0.0, -0.5, -np.inf]))
    np.testing.assert_allclose(frequencies(logits, Params(top_k=2)), want, atol=0.015)
    assert frequencies([0.0, -0.5, -1.0], Params(top_k=3))[2] > 0.1  # top_k = K cuts nothing


def test_top_p_keeps_the_candidates_before_the_mass_is_reached() -> None:
    # renormalised mass before the second candidate is 0.73 < 0.9: both stay, in their proportions
    np.testing.assert_allclose(frequencies([0.0, -1.0], Params(top_p=0.9)), softmax(np.array([0.0, -1.0])),
                               atol=0.015)
    # exactly 0.5 before the second of two equal candidates: it is cut
    assert frequencies([0.0, 0.0], Params(top_p=0.5))[1] == 0.0


def test_top_p_on_logits_too_large_or_too_far_apart_for_a_plain_exp() -> None:
    assert frequencies([500.0, 499.0], Params(top_p=0.5))[1] == 0.0  # exp(500 + 500) would overflow
    rows = np.array([[1000.0, 999.0], [0.0, -1.0]] * (N // 2), dtype=np.float32)  # each row by its own maximum
    chosen = sample(rows, Params(top_p=0.5), np.random.default_rng(0))
    assert not chosen.any()


def test_a_subset_of_picks_keeps_every_field_in_the_order_asked() -> None:
    picks = Picks(tokens=np.array([10, 11, 12]), log_probs=np.array([-0.1, -0.2, -0.3]),
                  greedy=np.array([20, 21, 22]), candidate_tokens=np.array([[1, 2], [3, 4], [5, 6]]),
                  candidate_log_probs=np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]))
    part = picks.subset(np.array([2, 0]))
    assert part.tokens.tolist() == [12, 10] and part.log_probs.tolist() == [-0.3, -0.1]
    assert part.greedy.tolist() == [22, 20] and part.candidate_tokens.tolist() == [[5, 6], [1, 2]]
    assert part.candidate_log_probs.tolist() == [[-5.0, -6.0], [-1.0, -2.0]]
    assert part.score(0, 1) == (-0.3, [(5, -5.0)])


def test_candidates_take_the_contract_dtypes_whatever_the_engine_returns() -> None:
    # an FP16 engine's half-precision logits and int32 token ids become the contract's float32 and int64, so the
    # host's arithmetic (log-softmax, the sums of log probs) is the same for every runtime and precision
    outputs: dict[str, np.ndarray] = {"top_tokens": np.array([[[5, 3]]], dtype=np.int32),
                                      "top_logits": np.array([[[2.5, -1.25]]], dtype=np.float16),
                                      "logsumexp": np.array([[3.0]], dtype=np.float16)}
    candidates = Candidates.from_outputs(outputs)
    assert (candidates.tokens.dtype, candidates.logits.dtype, candidates.logsumexp.dtype) == (
        np.int64, np.float32, np.float32)
    assert candidates.tokens.tolist() == [[[5, 3]]] and candidates.logits.tolist() == [[[2.5, -1.25]]]
    assert candidates.logsumexp.tolist() == [[3.0]]


@dataclass
class Row:
    params: Params
    rng: np.random.Generator


def test_pick_samples_at_any_temperature_above_zero_and_is_greedy_at_zero() -> None:
    # two equally likely candidates at 2,000 positions: a sample takes the second about half the time, greedy never
    n = 2_000
    candidates = Candidates(np.tile(np.array([7, 8]), (2, n, 1)), np.zeros((2, n, 2), dtype=np.float32),
                            np.full((2, n), np.log(2), dtype=np.float32))
    rows = [Row(Params(temperature=t), np.random.default_rng(0)) for t in (0.5, 0.0)]
    sampled, greedy = pick(candidates, rows, [n, n])
    assert abs(float(np.mean(sampled.tokens == 8)) - 0.5) < 0.05
    assert (greedy.tokens == 7).all() and (sampled.greedy == 7).all()
