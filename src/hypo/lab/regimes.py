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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypo.lab.bandit import Bandit, Labels, tabular_features

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


def make_bandit(regime: str, num_instances: int, generator: torch.Generator, sizes: Sizes = Sizes()) -> Bandit:
    """Random instances of a regime (see the module docstring). Shape: -> Bandit of I instances"""
    structure, _ = split_regime(regime)
    shape = (num_instances, sizes.num_contexts, sizes.num_responses)
    ref_logps = torch.log_softmax(sizes.ref_scale * torch.randn(shape, generator=generator, dtype=torch.float64), -1)
    d = sizes.num_features
    phi = torch.randn((*shape, d), generator=generator, dtype=torch.float64)
    w = torch.randn((num_instances, d), generator=generator, dtype=torch.float64) * sizes.reward_scale / d**0.5
    if structure.startswith("tabular"):
        reward = sizes.reward_scale * torch.randn(shape, generator=generator, dtype=torch.float64)
        features = tabular_features(*shape)
    else:
        features, reward = phi, torch.einsum("ixyd,id->ixy", phi, w)
    if structure == "tabular-global":
        return Bandit(features, ref_logps, reward, torch.ones(shape, dtype=torch.bool))
    if structure == "linear-trap":
        visible = torch.einsum("ixyd,id->ixy", phi[..., :-1], w[:, :-1])  # reward on the first d - 1 features
        covered = partial_cover(visible, sizes.num_covered, generator)
        frontier = visible.masked_fill(~covered, float("-inf")).max(-1, keepdim=True).values
        hidden = torch.where(covered, 0.0, (visible - frontier).clamp(min=0.0))  # 0 on the data
        features = torch.cat([phi[..., :-1], hidden.unsqueeze(-1)], dim=-1)
        reward = visible - 3.0 * hidden  # gold weight -3 on the hidden feature
        return Bandit(features, ref_logps, reward, covered)
    if structure == "linear-misspec":
        reward = reward - reward**2 / 4  # peaks at s = 2: extrapolating along w overshoots
    return Bandit(features, ref_logps, reward, partial_cover(reward, sizes.num_covered, generator))
