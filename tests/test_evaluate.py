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
    plot(scores, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_held_out_problems_are_checkable_and_disjoint_from_training():
    for p in held_out_set("addition", 200):
        a, b = map(int, p.prompt[:-1].split("+"))
        assert p.answer == str(a + b) and (31 * a + b) % 50 == 0 and max(a, b) < 10_000
    assert all(len(p.answer) >= 32 for p in held_out_set("upper", 50))
