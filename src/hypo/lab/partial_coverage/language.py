"""A synthetic word-level language built so that the offline pairs cover only part of the response space.

Prompts are "review the <item> <aspect> :"; a response is a sequence of words, each either one of 10
positive words or one of 20 neutral words. The reference response distribution (`sample_response`) has
its length L in the data's range [8, 12] with probability 0.85 and in the tails 4-7 or 13-24 otherwise; each
response draws a positive rate from Beta(2, 6) and each word is positive with that rate.

Offline pairs (`make_pairs`) hold two reference responses per pair prompt, both with L in [8, 12], labelled
Bradley-Terry on `base` = the number of positive words. The feature "words outside [8, 12]" never varies in
the pairs, so the pairs cannot tell the three gold worlds apart (`gold_score`): penalize (-1.5 per word outside
the range), ignore, reward (+1.0 per word outside the range). A sample that hits the length limit without EOS
counts as off range, and its words beyond the range count as outside.

Everything here is a pure function of its seed (`random.Random`), with no torch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ITEMS = ("phone", "laptop", "camera", "chair", "lamp", "kettle", "bike", "tent", "watch", "jacket",
         "guitar", "drone", "printer", "mixer", "sofa", "radio", "scooter", "monitor", "blender", "backpack")
ASPECTS = ("battery", "design", "price", "screen", "sound", "comfort", "size", "color", "weight", "speed",
           "grip", "finish", "setup", "manual", "warranty", "noise")
POSITIVE = ("great", "excellent", "superb", "lovely", "brilliant", "perfect", "amazing", "solid", "reliable",
            "wonderful")
NEUTRAL = ("it", "is", "was", "a", "and", "with", "very", "quite", "looks", "feels", "uses", "has", "this",
           "that", "of", "for", "some", "more", "one", "day")
PROMPT_WORDS = ("review", "the", ":")
SPECIAL = ("<pad>", "<eos>", "<unk>")

RANGE = (8, 12)
"""The data's length range (words): every offline response lies in it."""
IN_RANGE_PROB = 0.85
SHORT_TAIL, LONG_TAIL = (4, 7), (13, 24)
POSITIVE_RATE_BETA = (2.0, 6.0)
WORLDS = {"penalize": -1.5, "ignore": 0.0, "reward": 1.0}
"""Gold worlds: weight of the number of words outside the data's range, added to `base`."""


def vocabulary() -> list[str]:
    """Every token of the language, specials first (ids 0, 1, 2 = pad, eos, unk)."""
    return [*SPECIAL, *PROMPT_WORDS, *ITEMS, *ASPECTS, *POSITIVE, *NEUTRAL]


def all_prompts() -> list[str]:
    return [f"review the {item} {aspect} :" for item in ITEMS for aspect in ASPECTS]


@dataclass(frozen=True)
class PromptSplit:
    pairs: list[str]
    unlabeled: list[str]
    eval: list[str]


def split_prompts(seed: int, num_pairs: int = 128, num_unlabeled: int = 64, num_eval: int = 128) -> PromptSplit:
    """Disjoint pair, unlabeled (HyPO) and held-out prompt sets, shuffled by `seed`."""
    prompts = all_prompts()
    if num_pairs + num_unlabeled + num_eval > len(prompts):
        raise ValueError(f"only {len(prompts)} prompts")
    random.Random(seed).shuffle(prompts)
    return PromptSplit(prompts[:num_pairs], prompts[num_pairs : num_pairs + num_unlabeled],
                       prompts[num_pairs + num_unlabeled : num_pairs + num_unlabeled + num_eval])


def sample_length(rng: random.Random) -> int:
    if rng.random() < IN_RANGE_PROB:
        return rng.randint(*RANGE)
    return rng.randint(*SHORT_TAIL) if rng.random() < 0.5 else rng.randint(*LONG_TAIL)


def sample_response(rng: random.Random, length: int | None = None) -> str:
    """One response of the reference distribution (length drawn unless given)."""
    length = sample_length(rng) if length is None else length
    rate = rng.betavariate(*POSITIVE_RATE_BETA)
    return " ".join(rng.choice(POSITIVE) if rng.random() < rate else rng.choice(NEUTRAL) for _ in range(length))


def sample_in_range(rng: random.Random) -> str:
    """A reference response conditioned on its length lying in the data's range."""
    return sample_response(rng, rng.randint(*RANGE))


def pretraining_texts(seed: int, count: int, prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the reference distribution, to train the reference model on."""
    rng = random.Random(seed)
    return [(rng.choice(prompts), sample_response(rng)) for _ in range(count)]


def base_score(text: str) -> int:
    """The number of positive words."""
    return sum(word in POSITIVE for word in text.split())


def outside_words(text: str) -> int:
    """Words outside the data's range: max(0, L - 12) + max(0, 8 - L)."""
    length = len(text.split())
    return max(0, length - RANGE[1]) + max(0, RANGE[0] - length)


def is_off_range(text: str, clipped: bool = False) -> bool:
    """Length outside [8, 12], or the sample hit the length limit without EOS."""
    return clipped or outside_words(text) > 0


def gold_score(text: str, world: str) -> float:
    """base + weight(world) * words outside the range; equal to base on every in-range response."""
    return base_score(text) + WORLDS[world] * outside_words(text)


def make_pairs(prompts: list[str], pairs_per_prompt: int, seed: int) -> list[dict]:
    """Offline pairs, both responses in range, labelled Bradley-Terry: P(a preferred) = sigmoid(base(a) - base(b))."""
    rng = random.Random(seed)
    rows = []
    for prompt in prompts:
        for _ in range(pairs_per_prompt):
            a, b = sample_in_range(rng), sample_in_range(rng)
            p = 1.0 / (1.0 + math.exp(-(base_score(a) - base_score(b))))
            chosen, rejected = (a, b) if rng.random() < p else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
