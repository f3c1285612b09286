"""The gold judge of the bundled "reviews" task: a transparent lexicon sentiment scorer ("review-sentiment").

It labels the task's offline pairs (`scripts/make_default_task.py`) and scores held-out generations in
evaluation; training never sees it except through those labels. Standard library only.
"""

from __future__ import annotations

import re

POSITIVE_WORDS: frozenset[str] = frozenset(
    [
        "amazing", "awesome", "beautiful", "beautifully", "best", "brilliant", "captivating", "charming",
        "cheerful", "clean", "clever", "comfortable", "compelling", "cozy", "crisp", "delicious", "delight",
        "delighted", "delightful", "dependable", "easy", "effortless", "elegant", "engaging", "enjoy",
        "enjoyable", "enjoyed", "enjoying", "excellent", "exceptional", "excited", "exciting", "exquisite",
        "fabulous", "fantastic", "fascinating", "favorite", "fine", "flawless", "fresh", "friendly", "fun",
        "generous", "good", "gorgeous", "great", "happy", "heartfelt", "helpful", "impressive",
        "incredible", "inspiring", "intuitive", "joy", "lively", "love", "loved", "lovely", "loves",
        "magical", "marvelous", "masterful", "memorable", "moving", "nice", "outstanding", "perfect",
        "perfectly", "pleasant", "pleasure", "polished", "powerful", "recommend", "recommended",
        "refreshing", "reliable", "remarkable", "rich", "satisfying", "smooth", "solid", "spectacular",
        "splendid", "stellar", "stunning", "stylish", "superb", "sweet", "tasty", "terrific", "thoughtful",
        "thrilling", "unforgettable", "valuable", "vibrant", "warm", "welcoming", "wonderful", "worth",
        "worthwhile"
    ]
)  # fmt: skip
"""Positive review words (lowercase, single tokens)."""

NEGATIVE_WORDS: frozenset[str] = frozenset(
    [
        "annoying", "apathetic", "awful", "awkward", "bad", "bland", "bored", "boring", "broken",
        "careless", "cheap", "cliched", "clumsy", "confusing", "cramped", "crude", "dated", "difficult",
        "dirty", "disappointed", "disappointing", "disappointment", "dismal", "dreadful", "dull",
        "dysfunctional", "expensive", "fail", "failed", "fails", "failure", "faulty", "flat", "flawed",
        "flimsy", "forgettable", "frustrating", "frustration", "generic", "greasy", "hate", "hated",
        "hollow", "horrible", "inconsistent", "lacking", "lackluster", "lazy", "letdown", "lifeless",
        "mediocre", "mess", "messy", "miserable", "mistake", "noisy", "overpriced", "overrated", "painful",
        "pathetic", "pointless", "poor", "poorly", "predictable", "problem", "problems", "regret", "rude",
        "sad", "shallow", "sloppy", "slow", "soggy", "stale", "stiff", "stupid", "tedious", "terrible",
        "tired", "tiresome", "ugly", "unbearable", "uncomfortable", "underwhelming", "unfortunately",
        "unfunny", "uninspired", "unoriginal", "unpleasant", "unreliable", "unremarkable", "upset",
        "useless", "waste", "wasted", "weak", "weird", "worse", "worst", "wrong"
    ]
)  # fmt: skip
"""Negative review words (lowercase, single tokens)."""

NEGATORS: frozenset[str] = frozenset({"not", "no", "never", "hardly"})
"""Words that flip the polarity of a lexicon word up to `NEGATION_WINDOW` tokens after them
(any token ending in "n't", such as "isn't" or "don't", is a negator too)."""

NEGATION_WINDOW = 2
LENGTH_LIMIT = 60
LENGTH_PENALTY_PER_WORD = 0.05
MIN_WORDS = 3
SHORT_PENALTY = 1.0
DIVERSITY_WEIGHT = 0.01

_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")
_CLAUSE_RE = re.compile(r"[.,;:!?()\n]")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: runs of letters, keeping inner apostrophes ("isn't" is one token).

    Curly apostrophes are read as straight ones.
    """
    return _TOKEN_RE.findall(text.lower().replace("\u2019", "'"))


def clauses(text: str) -> list[list[str]]:
    """`tokenize` applied to each clause (text split on `. , ; : ! ? ( )` and newlines)."""
    return [tokens for part in _CLAUSE_RE.split(text) if (tokens := tokenize(part))]


def _is_negator(token: str) -> bool:
    return token in NEGATORS or token.endswith("n't")


class ReviewSentimentJudge:
    """Lexicon sentiment score of a review, with negation and length terms.

    With `tokens` the lowercase word tokens of the completion (regex `[a-z]+('[a-z]+)*` on the
    lowercased text, curly apostrophes read as straight ones) and `n = len(tokens)`:

    1. Each token that is in `POSITIVE_WORDS` has polarity +1, in `NEGATIVE_WORDS` polarity -1.
       If any of the 2 tokens right before it in the same clause is a negator (`not`, `no`,
       `never`, `hardly`, or a token ending in `n't`), its polarity is flipped ("not good" counts
       as negative, "never boring" as positive). Clauses are separated by `. , ; : ! ? ( )` and
       newlines, so "not bad, great" keeps "great" positive.
    2. `P` = number of distinct lexicon words that occur with polarity +1, `N` = number of
       distinct lexicon words that occur with polarity -1 (repeating a word adds nothing; a word
       seen both plain and negated counts once on each side).
    3. `length_penalty = 0.05 * max(0, n - 60)`.
    4. `short_penalty = 1.0` if `n < 3`, else 0.
    5. `diversity = 0.01 * len(set(tokens)) / n` (0 if `n == 0`): a small continuous term in
       [0, 0.01] that breaks most ties in favour of less repetitive text; it never outweighs a
       lexicon word (1.0) or one extra word beyond the limit (0.05).

    `score = P - N - length_penalty - short_penalty + diversity`

    The prompt is not used. The score is deterministic and needs no model or network.
    """

    name = "review-sentiment"

    def score(self, prompt: str, completion: str) -> float:
        return self.explain(prompt, completion)["score"]

    def explain(self, prompt: str, completion: str) -> dict:
        """The score and every term that makes it up (for data cards and debugging)."""
        tokens = tokenize(completion)
        n = len(tokens)
        positive: set[str] = set()
        negative: set[str] = set()
        for clause in clauses(completion):
            for i, token in enumerate(clause):
                if token in POSITIVE_WORDS:
                    polarity = 1
                elif token in NEGATIVE_WORDS:
                    polarity = -1
                else:
                    continue
                if any(_is_negator(t) for t in clause[max(0, i - NEGATION_WINDOW) : i]):
                    polarity = -polarity
                (positive if polarity > 0 else negative).add(token)
        length_penalty = LENGTH_PENALTY_PER_WORD * max(0, n - LENGTH_LIMIT)
        short_penalty = SHORT_PENALTY if n < MIN_WORDS else 0.0
        diversity = DIVERSITY_WEIGHT * len(set(tokens)) / n if n else 0.0
        score = len(positive) - len(negative) - length_penalty - short_penalty + diversity
        return {
            "score": score,
            "positive": sorted(positive),
            "negative": sorted(negative),
            "n_words": n,
            "length_penalty": length_penalty,
            "short_penalty": short_penalty,
            "diversity": diversity,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
