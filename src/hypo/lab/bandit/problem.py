"""Exact contextual bandits for the coverage lab: policies, offline pairs, objectives, metrics.

A batch of I independent bandit instances, each with X contexts (uniform) and a finite set of Y
responses, so that the policy, its reverse KL to the reference and its expected gold reward are exact.
Policies are log-linear around the reference (Song et al., arXiv 2406.01462, section 3):
    pi_theta(y|x) = pi_ref(y|x) exp(theta . phi(x, y)) / Z_theta(x),
so theta = 0 is the reference. A tabular policy is the special case of one-hot features.
The losses are hypo.objective.losses (dpo_loss, kl_surrogate): nothing here re-implements them.
Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from hypo.objective.losses import dpo_loss, kl_surrogate

Labels = Literal["bt", "deterministic"]
Method = Literal["reference", "dpo", "hypo", "hypo_sampled", "rlhf"]


@dataclass(frozen=True)
class Bandit:
    """I bandit instances with X contexts and Y responses; d policy features."""

    features: torch.Tensor  # (I, X, Y, d) phi(x, y)
    ref_logps: torch.Tensor  # (I, X, Y) log pi_ref(y|x), normalized over y
    reward: torch.Tensor  # (I, X, Y) gold reward r(x, y)
    covered: torch.Tensor  # (I, X, Y) bool: y can appear in the offline pairs of x


@dataclass(frozen=True)
class Pairs:
    """Offline preference pairs, N per instance: (context, chosen, rejected) as indices."""

    context: torch.Tensor  # (I, N) long in [0, X)
    chosen: torch.Tensor  # (I, N) long in [0, Y)
    rejected: torch.Tensor  # (I, N) long in [0, Y)


@dataclass(frozen=True)
class MethodSpec:
    """One training run. `beta` is the DPO / RLHF temperature, `kl_coef` HyPO's lambda (paper eq. 6)."""

    method: Method
    beta: float = 0.1
    kl_coef: float = 0.0
    num_generations: int = 4  # k samples per context for hypo_sampled

    @property
    def label(self) -> str:
        if self.method == "reference":
            return "reference"
        if self.method in ("hypo", "hypo_sampled"):
            return f"{self.method} beta={self.beta:g} kl_coef={self.kl_coef:g}"
        return f"{self.method} beta={self.beta:g}"


def tabular_features(num_instances: int, num_contexts: int, num_responses: int) -> torch.Tensor:
    """One-hot features: theta has one entry per (x, y), the tabular softmax policy.

    Shape: -> (I, X, Y, X * Y)
    """
    eye = torch.eye(num_contexts * num_responses, dtype=torch.float64)
    return eye.view(num_contexts, num_responses, -1).expand(num_instances, -1, -1, -1).contiguous()


def policy_logps(theta: torch.Tensor, bandit: Bandit) -> torch.Tensor:
    """log pi_theta(y|x) = log_softmax_y(log pi_ref(y|x) + theta . phi(x, y)).

    Shape: theta (I, d) -> (I, X, Y)
    """
    scores = torch.einsum("ixyd,id->ixy", bandit.features, theta)
    return torch.log_softmax(bandit.ref_logps + scores, dim=-1)


def reverse_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref)(x) = sum_y pi(y|x) (log pi(y|x) - log pi_ref(y|x)).

    Shape: (I, X, Y), (I, X, Y) -> (I, X)
    """
    return (logps.exp() * (logps - ref_logps)).sum(-1)


def expected_reward(logps: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """E_{y ~ pi(.|x)} r(x, y). Shape: (I, X, Y), (I, X, Y) -> (I, X)"""
    return (logps.exp() * reward).sum(-1)


def win_rate(logps: torch.Tensor, ref_logps: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """P(y ~ pi beats y' ~ pi_ref) under the gold reward ordering, ties counted half.

    Shape: (I, X, Y), (I, X, Y), (I, X, Y) -> (I, X)
    """
    diff = reward.unsqueeze(-1) - reward.unsqueeze(-2)  # (I, X, Y, Y'): r(y) - r(y')
    beats = (diff > 0).to(logps.dtype) + 0.5 * (diff == 0).to(logps.dtype)
    return torch.einsum("ixy,ixyz,ixz->ix", logps.exp(), beats, ref_logps.exp())


def mass_on(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pi(mask | x) = sum of pi(y|x) over responses with mask true. Shape: (I, X, Y), bool (I, X, Y) -> (I, X)"""
    return (logps.exp() * mask).sum(-1)


def best_unseen(bandit: Bandit) -> torch.Tensor:
    """One-hot mask of the best response by gold reward among those not covered (all false if none).

    Shape: -> bool (I, X, Y)
    """
    masked = bandit.reward.masked_fill(bandit.covered, float("-inf"))
    best = F.one_hot(masked.argmax(-1), bandit.reward.shape[-1]).bool()
    return best & ~bandit.covered


def gather_pairs(values: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """values[i, context, chosen] and values[i, context, rejected] for each pair.

    Shape: values (I, X, Y) -> (I, N), (I, N)
    """
    num_responses = values.shape[-1]
    flat = values.flatten(1)  # (I, X * Y)
    chosen = flat.gather(1, pairs.context * num_responses + pairs.chosen)
    rejected = flat.gather(1, pairs.context * num_responses + pairs.rejected)
    return chosen, rejected


def sample_pairs(bandit: Bandit, num_pairs: int, *, labels: Labels, generator: torch.Generator) -> Pairs:
    """Offline pairs: x uniform, two distinct covered responses uniform, labelled by the gold reward.

    labels="bt": y1 preferred with probability sigmoid(r(y1) - r(y2)) (Bradley-Terry, noisy);
    labels="deterministic": the higher gold reward always wins (separable data).
    Shape: -> Pairs with (I, N) tensors
    """
    num_instances, num_contexts, _ = bandit.reward.shape
    context = torch.randint(num_contexts, (num_instances, num_pairs), generator=generator)
    weights = bandit.covered.gather(1, context.unsqueeze(-1).expand(-1, -1, bandit.reward.shape[-1]))
    picks = torch.multinomial(weights.flatten(0, 1).double(), 2, generator=generator)  # (I * N, 2)
    first, second = picks[:, 0].view(num_instances, -1), picks[:, 1].view(num_instances, -1)
    r1, r2 = gather_pairs(bandit.reward, Pairs(context, first, second))
    if labels == "bt":
        first_wins = torch.rand(r1.shape, generator=generator, dtype=torch.float64) < torch.sigmoid(r1 - r2)
    else:
        first_wins = r1 > r2
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return Pairs(context, chosen, rejected)


def dpo_objective(theta: torch.Tensor, bandit: Bandit, pairs: Pairs, *, beta: float) -> torch.Tensor:
    """Mean DPO loss over the offline pairs of each instance (hypo.objective.losses.dpo_loss).

    Shape: theta (I, d) -> (I,)
    """
    policy_chosen, policy_rejected = gather_pairs(policy_logps(theta, bandit), pairs)
    ref_chosen, ref_rejected = gather_pairs(bandit.ref_logps, pairs)
    losses, _, _ = dpo_loss(policy_chosen.flatten(), policy_rejected.flatten(), ref_chosen.flatten(),
                            ref_rejected.flatten(), beta=beta)
    return losses.view(pairs.context.shape).mean(-1)


def exact_kl_objective(theta: torch.Tensor, bandit: Bandit) -> torch.Tensor:
    """E_x KL(pi_theta || pi_ref)(x), exact and differentiable. Shape: theta (I, d) -> (I,)"""
    return reverse_kl(policy_logps(theta, bandit), bandit.ref_logps).mean(-1)


def sampled_kl_objective(theta: torch.Tensor, bandit: Bandit, *, num_generations: int,
                         generator: torch.Generator) -> torch.Tensor:
    """HyPO's online term (paper Algorithm 1): k samples y ~ pi_theta(.|x) for every context, scored by
    hypo.objective.losses.kl_surrogate (REINFORCE with a leave-one-out baseline). Its gradient is an unbiased
    estimate of grad E_x KL(pi_theta || pi_ref)(x); its value is not the KL.

    Shape: theta (I, d) -> (I,)
    """
    logps = policy_logps(theta, bandit)  # (I, X, Y)
    num_instances, num_contexts, num_responses = logps.shape
    flat = logps.reshape(-1, num_responses)  # (I * X, Y)
    samples = torch.multinomial(flat.detach().exp(), num_generations, replacement=True, generator=generator)
    policy = flat.gather(1, samples).flatten()  # (I * X * k,)
    ref = bandit.ref_logps.reshape(-1, num_responses).gather(1, samples).flatten()
    surrogate = kl_surrogate(policy, ref, num_generations=num_generations)
    return surrogate.view(num_instances, -1).mean(-1)
