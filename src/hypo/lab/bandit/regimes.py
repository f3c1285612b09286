"""Random bandit instances for each coverage regime of the lab (docs/coverage-lab.md).

Every regime: X contexts (uniform), Y responses, a random softmax reference pi_ref, a gold reward, and
a covered set that the offline pairs are drawn from. Under partial coverage the best response of every
context is never covered (the paper's "partial coverage", arXiv 2406.01462 section 4).
- tabular-global: tabular policy, every response covered (the control).
- tabular-partial: tabular policy, `num_covered` of Y covered.
- linear-identified: log-linear policy, gold reward linear in the policy's features (in the class).
- linear-trap: log-linear, reward linear in the features but one feature is 0 on every covered response
  (not identified by the data) and penalizes uncovered responses that score beyond the best covered one
  on the visible features (over-optimization beyond the data).
- linear-misspec: log-linear, gold reward s - s^2 / 4 with s = w . phi, not linear in the features.
The label suffix picks Bradley-Terry ("-bt") or deterministic ("-det") labels.

Reward worlds (`make_bandit_worlds`): under partial coverage the offline pairs say nothing about the
gold reward of uncovered responses, so every regime is also scored in other worlds that agree with the
regime's gold reward on every covered response (hence the same label probabilities and, with the same
random draws, the same pairs) and differ off the data:
- "beyond a" for a in (-3, 0, +3): the reward without any trap term plus a x beyond(x, y), where
  beyond = max(0, s(y) - max over covered y' of s(y')) on uncovered responses and 0 on covered ones,
  s the score the data rank by (the gold reward for tabular and linear-identified, w . phi for
  linear-misspec, the visible score for linear-trap, whose hidden feature is exactly `beyond`): is
  going past the best covered response penalized, neutral or rewarded? linear-trap is "beyond -3".
- "unseen c" for c in (-1.5, +1.5): the regime's gold reward plus c on every uncovered response.
Under global coverage nothing is uncovered and the only world is the regime's own ("as built").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypo.lab.bandit.problem import Bandit, Labels, tabular_features

STRUCTURES = ("tabular-global", "tabular-partial", "linear-identified", "linear-trap", "linear-misspec")
REGIMES = ("tabular-global-bt", "tabular-partial-bt", "tabular-partial-det", "linear-identified-bt",
           "linear-identified-det", "linear-trap-bt", "linear-trap-det", "linear-misspec-bt")


@dataclass(frozen=True)
class Sizes:
    num_contexts: int = 4
    num_responses: int = 30
    num_features: int = 6
    num_covered: int = 8
    reward_scale: float = 1.5
    """Standard deviation of the gold reward across responses (sets the Bradley-Terry noise)."""
    ref_scale: float = 1.0
    """Standard deviation of the reference logits (0: uniform reference)."""


def split_regime(regime: str) -> tuple[str, Labels]:
    """'linear-trap-det' -> ('linear-trap', 'deterministic')."""
    structure, _, suffix = regime.rpartition("-")
    if structure not in STRUCTURES or suffix not in ("bt", "det"):
        raise ValueError(f"unknown regime {regime!r}; expected one of {', '.join(REGIMES)} (or -bt / -det)")
    return structure, "bt" if suffix == "bt" else "deterministic"


def partial_cover(reward: torch.Tensor, num_covered: int, generator: torch.Generator) -> torch.Tensor:
    """A random `num_covered` of the responses of each context, never the best one.

    Shape: reward (I, X, Y) -> bool (I, X, Y)
    """
    keys = torch.rand(reward.shape, generator=generator, dtype=torch.float64)
    keys = keys.masked_fill(reward == reward.max(-1, keepdim=True).values, 2.0)  # the best sorts last
    ranks = keys.argsort(-1).argsort(-1)
    return ranks < num_covered


BEYOND_WEIGHTS = (-3.0, 0.0, 3.0)
"""Weights a of the "beyond a" worlds; the linear-trap regime is built with a = -3."""
UNSEEN_SHIFTS = (-1.5, 1.5)
"""Shifts c of the "unseen c" worlds (one standard deviation of the gold reward)."""
TRAP_WEIGHT = -3.0
"""Gold weight of linear-trap's hidden feature."""


def world_name(kind: str, value: float) -> str:
    """('beyond', -3.0) -> 'beyond -3'; ('beyond', 0.0) -> 'beyond 0'; ('unseen', 1.5) -> 'unseen +1.5'."""
    return f"{kind} {value:+g}" if value else f"{kind} 0"


def as_built_world(regime: str) -> str:
    """Name of the world a regime's own gold reward is in (its pairs are labelled by it)."""
    structure, _ = split_regime(regime)
    if structure == "tabular-global":
        return "as built"
    return world_name("beyond", TRAP_WEIGHT if structure == "linear-trap" else 0.0)


def beyond_frontier(score: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """max(0, s(x, y) - max over covered y' of s(x, y')) on uncovered responses, 0 on covered ones.

    Shape: score (I, X, Y), bool covered (I, X, Y) -> (I, X, Y)
    """
    frontier = score.masked_fill(~covered, float("-inf")).max(-1, keepdim=True).values
    return torch.where(covered, 0.0, (score - frontier).clamp(min=0.0))


def reward_worlds(visible: torch.Tensor, score: torch.Tensor, covered: torch.Tensor,
                  as_built: str) -> dict[str, torch.Tensor]:
    """Gold rewards that agree with each other on every covered response (module docstring).

    visible: the reward without any trap term; score: the score the data rank by; as_built: the name of
    the regime's own world ("as built": global coverage, the only world; else one of the "beyond" worlds).
    Shape: (I, X, Y) each -> {name: (I, X, Y)}
    """
    if as_built == "as built":
        return {"as built": visible}
    beyond = beyond_frontier(score, covered)
    worlds = {world_name("beyond", a): visible + a * beyond for a in BEYOND_WEIGHTS}
    for c in UNSEEN_SHIFTS:
        worlds[world_name("unseen", c)] = worlds[as_built] + c * (~covered).to(visible.dtype)
    return worlds


def make_bandit_worlds(regime: str, num_instances: int, generator: torch.Generator,
                       sizes: Sizes = Sizes()) -> tuple[Bandit, dict[str, torch.Tensor]]:
    """Random instances of a regime (module docstring) and its reward worlds; the Bandit carries the
    regime's own gold reward, worlds[as_built_world(regime)].

    Shape: -> Bandit of I instances, {name: (I, X, Y)}
    """
    structure, _ = split_regime(regime)
    shape = (num_instances, sizes.num_contexts, sizes.num_responses)
    ref_logps = torch.log_softmax(sizes.ref_scale * torch.randn(shape, generator=generator, dtype=torch.float64), -1)
    d = sizes.num_features
    phi = torch.randn((*shape, d), generator=generator, dtype=torch.float64)
    w = torch.randn((num_instances, d), generator=generator, dtype=torch.float64) * sizes.reward_scale / d**0.5
    if structure.startswith("tabular"):
        reward = sizes.reward_scale * torch.randn(shape, generator=generator, dtype=torch.float64)
        features, score = tabular_features(*shape), reward
    else:
        features, reward = phi, torch.einsum("ixyd,id->ixy", phi, w)
        score = reward
    if structure == "tabular-global":
        covered = torch.ones(shape, dtype=torch.bool)
    elif structure == "linear-trap":
        score = reward = torch.einsum("ixyd,id->ixy", phi[..., :-1], w[:, :-1])  # the first d - 1 features
        covered = partial_cover(score, sizes.num_covered, generator)
        hidden = beyond_frontier(score, covered)  # 0 on the data
        features = torch.cat([phi[..., :-1], hidden.unsqueeze(-1)], dim=-1)
    else:
        if structure == "linear-misspec":
            reward = score - score**2 / 4  # peaks at s = 2: extrapolating along w overshoots
        covered = partial_cover(reward, sizes.num_covered, generator)
    worlds = reward_worlds(reward, score, covered, as_built_world(regime))
    return Bandit(features, ref_logps, worlds[as_built_world(regime)], covered), worlds
