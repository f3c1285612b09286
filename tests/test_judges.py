"""Judges: comparison, the registry (bundled tasks' judges and the users'), the protocol."""

from __future__ import annotations

import pytest

from hypo.evaluation import judges
from hypo.evaluation.judges import Judge, available_judges, compare, get_judge, register_judge
from hypo.tasks.reviews.judge import ReviewSentimentJudge

J = ReviewSentimentJudge()


def test_compare():
    good, bad = "A wonderful, charming film.", "A dull and tedious film."
    assert compare(J, "p", good, bad) == 1.0
    assert compare(J, "p", bad, good) == 0.0
    assert compare(J, "p", good, good) == 0.5


class _ConstantJudge:
    name = "constant"

    def score(self, prompt: str, completion: str) -> float:
        return 0.0


def test_compare_ties_with_any_judge():
    assert compare(_ConstantJudge(), "p", "a", "b") == 0.5


def test_get_judge_and_protocol():
    judge = get_judge("review-sentiment")
    assert isinstance(judge, ReviewSentimentJudge)
    assert isinstance(judge, Judge)
    assert judge.name == "review-sentiment"
    assert "review-sentiment" in available_judges()


def test_unknown_judge_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown judge 'nope'.*review-sentiment"):
        get_judge("nope")


def test_register_judge(monkeypatch):
    monkeypatch.setattr(judges, "_REGISTRY", dict(judges._REGISTRY))
    register_judge("constant", _ConstantJudge)
    judge = get_judge("constant")
    assert isinstance(judge, _ConstantJudge)
    assert compare(judge, "p", "x", "y") == 0.5
    assert "constant" in available_judges()
    # registering a name again replaces the factory
    register_judge("constant", ReviewSentimentJudge)
    assert isinstance(get_judge("constant"), ReviewSentimentJudge)


def test_register_judge_rejects_bad_input(monkeypatch):
    monkeypatch.setattr(judges, "_REGISTRY", dict(judges._REGISTRY))
    with pytest.raises(TypeError):
        register_judge("x", 42)
    with pytest.raises(ValueError):
        register_judge("", _ConstantJudge)
    register_judge("no-score", object)
    with pytest.raises(TypeError, match="score"):
        get_judge("no-score")
