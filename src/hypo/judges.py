"""Gold judges: deterministic, transparent scorers used to label preference pairs and to evaluate.

A judge is never a training reward in HyPO: it only decides which of two offline responses is
`chosen` when the bundled data is made, and it scores held-out generations during evaluation.

The built-in judge is `ReviewSentimentJudge` (name "review-sentiment"), a lexicon-based sentiment
scorer for the default "reviews" task. Users can add their own with `register_judge`.
`RewardModelJudge` (name "rm:<path>") scores with any Hugging Face sequence-classification model, and
`hypo.llm_judge.LLMJudge` compares two answers with a chat model behind an OpenAI-compatible endpoint.

This module imports the standard library only (torch and transformers inside `RewardModelJudge`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = [
    "Judge",
    "PairwiseJudge",
    "ReviewSentimentJudge",
    "RewardModelJudge",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "NEGATORS",
    "compare",
    "score_all",
    "get_judge",
    "register_judge",
    "available_judges",
]


@runtime_checkable
class Judge(Protocol):
    """Anything with a `name` and a `score(prompt, completion) -> float` (higher is better).

    `prompt` is the plain user text; for message lists pass the content of the last user message.
    """

    name: str

    def score(self, prompt: str, completion: str) -> float: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    """A judge that only compares: `compare(prompt, a, b)` is 1.0 if `a` is better, 0.0 if `b`, 0.5 a tie."""

    name: str

    def compare(self, prompt: str, completion_a: str, completion_b: str) -> float: ...


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


def compare(judge: Judge | PairwiseJudge, prompt: str, completion_a: str, completion_b: str) -> float:
    """1.0 if the judge scores `completion_a` higher, 0.0 if `completion_b`, 0.5 on an exact tie.

    A judge with its own `compare` method (a pairwise judge) decides directly.
    """
    if callable(getattr(judge, "compare", None)):
        return float(judge.compare(prompt, completion_a, completion_b))
    score_a = judge.score(prompt, completion_a)
    score_b = judge.score(prompt, completion_b)
    if score_a > score_b:
        return 1.0
    if score_a < score_b:
        return 0.0
    return 0.5


def score_all(judge: Judge, prompts: list[str], completions: list[str]) -> list[float]:
    """`judge.score` of each (prompt, completion), through `judge.score_batch` when the judge has one."""
    if callable(getattr(judge, "score_batch", None)):
        return [float(v) for v in judge.score_batch(prompts, completions)]
    return [float(judge.score(p, c)) for p, c in zip(prompts, completions, strict=True)]


class RewardModelJudge:
    """Scores with a Hugging Face sequence-classification model with one output (a reward model).

    The text scored is the tokenizer's chat template applied to
    `[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]` when the
    tokenizer has a template, else `prompt + "\n" + completion`. Batches are right-padded, so each score
    is exactly the model's output on the text alone. `path` is a hub id or a local folder.
    """

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.batch_size, self.max_length = f"rm:{path}", batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one output (num_labels=1), "
                             f"this one has {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, prompt: str, completion: str) -> str:
        """The exact text the reward model reads."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n{completion}"

    def score_batch(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion), `batch_size` texts per forward pass.

        Shape: logits (B, 1) -> B scores
        """
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        special = not getattr(self.tokenizer, "chat_template", None)  # templates carry their own specials
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length, add_special_tokens=special)
            with torch.no_grad():
                logits = self.model(**encoded.to(self.device)).logits  # (B, 1)
            scores += logits[:, 0].float().tolist()
        return scores

    def score(self, prompt: str, completion: str) -> float:
        return self.score_batch([prompt], [completion])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name[3:]!r})"


@functools.lru_cache(maxsize=2)
def _reward_model_judge(path: str) -> RewardModelJudge:
    return RewardModelJudge(path)


_REGISTRY: dict[str, Callable[[], Judge]] = {
    ReviewSentimentJudge.name: ReviewSentimentJudge,
}


def register_judge(name: str, factory: Callable[[], Judge]) -> None:
    """Make `get_judge(name)` return `factory()`; an existing name is replaced."""
    if not isinstance(name, str) or not name:
        raise ValueError("judge name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for judge {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def available_judges() -> list[str]:
    """Registered judge names, sorted."""
    return sorted(_REGISTRY)


def get_judge(name: str) -> Judge:
    """A new instance of the judge registered under `name`; `rm:<path>` gives a `RewardModelJudge`, loaded
    once per process (evaluations every few training steps reuse it)."""
    if name.startswith("rm:"):
        if not name[3:]:
            raise ValueError("judge 'rm:' needs a model path or hub id, e.g. rm:./my-reward-model")
        return _reward_model_judge(name[3:])
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_judges())
        raise ValueError(f"unknown judge {name!r}; known judges: {known}, or rm:<reward model path>") from None
    judge = factory()
    if not callable(getattr(judge, "score", None)):
        raise TypeError(f"judge {name!r} has no score(prompt, completion) method")
    return judge
