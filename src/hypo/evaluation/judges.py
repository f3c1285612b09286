"""Gold judges: deterministic, transparent scorers used to label preference pairs and to evaluate.

A judge is never a training reward in HyPO: it only decides which of two offline responses is
`chosen` when the bundled data is made, and it scores held-out generations during evaluation.

Each bundled task brings its gold judge (the "reviews" task: "review-sentiment", in
`hypo.tasks.reviews.judge`). Users can add their own with `register_judge`.
`RewardModelJudge` (name "rm:<path>") scores with any Hugging Face sequence-classification model, and
`hypo.evaluation.llm_judge.LLMJudge` compares two answers with a chat model behind an OpenAI-compatible endpoint.

This module imports the standard library only (torch and transformers inside `RewardModelJudge`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = [
    "Judge",
    "PairwiseJudge",
    "RewardModelJudge",
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
    """A judge that only compares: `compare(prompt, a, b)` is 1.0 if `a` is better, 0.0 if `b`, 0.5 a tie, and
    None when it could not judge (an invalid judgment)."""

    name: str

    def compare(self, prompt: str, completion_a: str, completion_b: str) -> float | None: ...


def compare(judge: Judge | PairwiseJudge, prompt: str, completion_a: str, completion_b: str) -> float | None:
    """1.0 if the judge scores `completion_a` higher, 0.0 if `completion_b`, 0.5 on an exact tie.

    A judge with its own `compare` method (a pairwise judge) decides directly; it may return None when it
    could not judge (an invalid judgment, neither a win, a loss nor a tie).
    """
    if callable(getattr(judge, "compare", None)):
        win = judge.compare(prompt, completion_a, completion_b)
        return None if win is None else float(win)
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


_REGISTRY: dict[str, Callable[[], Judge]] = {}
"""Judges registered by users; the bundled tasks' gold judges come from `hypo.tasks.task_judges`."""


def _factories() -> dict[str, Callable[[], Judge]]:
    from hypo.tasks import task_judges

    return {**task_judges(), **_REGISTRY}


def register_judge(name: str, factory: Callable[[], Judge]) -> None:
    """Make `get_judge(name)` return `factory()`; an existing name is replaced."""
    if not isinstance(name, str) or not name:
        raise ValueError("judge name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for judge {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def available_judges() -> list[str]:
    """Registered judge names (the bundled tasks' and the users'), sorted."""
    return sorted(_factories())


def get_judge(name: str) -> Judge:
    """A new instance of the judge registered under `name`; `rm:<path>` gives a `RewardModelJudge`, loaded
    once per process (evaluations every few training steps reuse it)."""
    if name.startswith("rm:"):
        if not name[3:]:
            raise ValueError("judge 'rm:' needs a model path or hub id, e.g. rm:./my-reward-model")
        return _reward_model_judge(name[3:])
    try:
        factory = _factories()[name]
    except KeyError:
        known = ", ".join(available_judges())
        raise ValueError(f"unknown judge {name!r}; known judges: {known}, or rm:<reward model path>") from None
    judge = factory()
    if not callable(getattr(judge, "score", None)):
        raise TypeError(f"judge {name!r} has no score(prompt, completion) method")
    return judge
