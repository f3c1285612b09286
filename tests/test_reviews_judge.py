"""The bundled task's gold judge "review-sentiment": exact formula values, negation, length terms."""

from __future__ import annotations

import pytest

from hypo.tasks.reviews import judge as reviews
from hypo.tasks.reviews.judge import ReviewSentimentJudge, tokenize

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
    assert not reviews.POSITIVE_WORDS & reviews.NEGATIVE_WORDS
    for word in reviews.POSITIVE_WORDS | reviews.NEGATIVE_WORDS:
        assert tokenize(word) == [word]
    assert 80 <= len(reviews.POSITIVE_WORDS) <= 120
    assert 80 <= len(reviews.NEGATIVE_WORDS) <= 120
