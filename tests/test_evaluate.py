"""The quality harness scores every setting and writes its JSON and plot."""

from __future__ import annotations

from export.evaluate import evaluate, plot, settings
from export.tasks import TASKS, held_out_set


def test_harness_scores_every_setting_and_plots(miniature, tmp_path):
    scores = evaluate(miniature, {t: 3 for t in TASKS}, batch=8)
    assert len(scores) == len(TASKS) * len(settings())
    for s in scores:
        assert 0.0 <= s.accuracy <= 1.0 and s.tokens_per_forward > 0
        assert (s.hallucination_rate is None) == (s.mode != "diffusion")
    by = {(s.task, s.setting): s for s in scores}
    # floors the shipped miniature meets (README, "Quality"): it upper-cases perfectly in ar, speculative decoding
    # is lossless against ar, and parallel decoding of a whole block saves forwards
    assert by[("upper", "ar")].accuracy == 1.0
    for task in TASKS:
        assert by[(task, "speculative")].accuracy == by[(task, "ar")].accuracy
    assert by[("upper", "diffusion t=0.9")].accuracy >= 2 / 3
    assert by[("upper", "diffusion t=0.9")].tokens_per_forward > 2 * by[("upper", "ar")].tokens_per_forward
    plot(scores, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_held_out_problems_are_checkable_and_disjoint_from_training():
    for p in held_out_set("addition", 200):
        a, b = map(int, p.prompt[:-1].split("+"))
        assert p.answer == str(a + b) and (31 * a + b) % 50 == 0 and max(a, b) < 10_000
    assert all(len(p.answer) >= 32 for p in held_out_set("upper", 50))
