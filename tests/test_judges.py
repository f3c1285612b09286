"""The gold judge "review-sentiment": exact formula values, negation, length terms, registry."""

from __future__ import annotations

import pytest

from hypo import judges
from hypo.judges import (
    Judge,
    ReviewSentimentJudge,
    available_judges,
    compare,
    get_judge,
    register_judge,
    tokenize,
)

J = ReviewSentimentJudge()


def score(text: str) -> float:
    return J.score("Write a short review of the novel 'The Quiet Harbor'.", text)


def test_tokenize_lowercases_and_keeps_contractions():
    assert tokenize("It ISN'T bad, it\u2019s 10/10 Great!") == ["it", "isn't", "bad", "it's", "great"]


def test_positive_words_and_diversity_term():
    # tokens: the food was great and the staff were friendly (9), distinct 8
    # P = {great, friendly} = 2, N = 0 -> 2 + 0.01 * 8 / 9
    assert score("The food was great and the staff were friendly.") == pytest.approx(2 + 0.01 * 8 / 9)


def test_negative_words():
    # tokens: boring plot and a rude waiter (6), distinct 6; N = {boring, rude} -> -2 + 0.01
    assert score("Boring plot and a rude waiter.") == pytest.approx(-2 + 0.01)


def test_repeated_word_counts_once():
    # tokens: great great great movie (4), distinct 2; P = 1 -> 1 + 0.01 * 2 / 4
    assert score("Great, great, GREAT movie") == pytest.approx(1 + 0.005)


def test_negation_flips_polarity():
    # "not good": good counts as negative -> -1 + 0.01 * 5 / 5
    assert score("The plot was not good") == pytest.approx(-1 + 0.01)
    # "isn't bad": bad counts as positive; tokens it isn't bad at all (5) -> 1 + 0.01
    assert score("It isn't bad at all") == pytest.approx(1 + 0.01)
    # curly apostrophe: "don't hate" -> hate positive; tokens i don't hate it (4) -> 1 + 0.01
    assert score("I don\u2019t hate it") == pytest.approx(1 + 0.01)
    # "never" and "hardly" are negators too: boring and disappointing both flip -> 2 + 0.01 * 5 / 5
    assert score("never boring, hardly disappointing") == pytest.approx(2 + 0.01)


def test_negation_window_is_two_tokens():
    # good is 3 tokens after "not": not flipped; tokens not a very good film (5) -> 1 + 0.01
    assert score("not a very good film") == pytest.approx(1 + 0.01)
    # 2 tokens after "not": flipped -> -1 + 0.01
    assert score("not very good film") == pytest.approx(-1 + 0.01)


def test_negation_stops_at_clause_punctuation():
    # clause "not bad" -> bad positive; clause "great fun" -> not negated
    # P = {bad, great, fun} = 3; tokens not bad great fun (4), distinct 4 -> 3 + 0.01
    assert score("Not bad, great fun.") == pytest.approx(3 + 0.01)


def test_word_seen_plain_and_negated_counts_on_both_sides():
    # clause 1: good (+); clause 2: not good (-) -> P = 1, N = 1
    # tokens good not good (3), distinct 2 -> 0 + 0.01 * 2 / 3
    assert score("Good; not good.") == pytest.approx(0.01 * 2 / 3)


def test_length_penalty_beyond_60_words():
    # 60 tokens: no penalty; tokens great + 59 x "word", distinct 2 -> 1 + 0.01 * 2 / 60
    assert score("great " + "word " * 59) == pytest.approx(1 + 0.01 * 2 / 60)
    # 70 tokens: 0.05 * 10 = 0.5 penalty -> 1 - 0.5 + 0.01 * 2 / 70
    assert score("great " + "word " * 69) == pytest.approx(0.5 + 0.01 * 2 / 70)


def test_short_penalty_below_3_words():
    # 1 token: P = 1, short penalty 1.0, diversity 0.01 * 1 / 1 -> 0.01
    assert score("Great!") == pytest.approx(0.01)
    # empty: -1.0 (no diversity term)
    assert score("") == -1.0
    assert score("  ...  ") == -1.0
    # 3 tokens: no short penalty -> 1 + 0.01
    assert score("Great food here") == pytest.approx(1 + 0.01)


def test_prompt_is_ignored_and_score_is_deterministic():
    text = "A lovely little café, but the coffee was stale."
    assert J.score("a", text) == J.score("b", text) == J.score("a", text)


def test_explain_matches_score():
    info = J.explain("", "Not bad, but the ending was weak.")
    assert info["positive"] == ["bad"]
    assert info["negative"] == ["weak"]
    assert info["n_words"] == 7
    assert info["score"] == J.score("", "Not bad, but the ending was weak.")
    assert info["score"] == pytest.approx(1 - 1 + 0.01 * 7 / 7)


def test_lexicons_are_disjoint_lowercase_words():
    assert not judges.POSITIVE_WORDS & judges.NEGATIVE_WORDS
    for word in judges.POSITIVE_WORDS | judges.NEGATIVE_WORDS:
        assert tokenize(word) == [word]
    assert 80 <= len(judges.POSITIVE_WORDS) <= 120
    assert 80 <= len(judges.NEGATIVE_WORDS) <= 120


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
