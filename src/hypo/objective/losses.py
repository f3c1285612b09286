"""Loss functions and KL estimates. Pure torch; every function returns per-example tensors.

All inputs are sequence-level log-probabilities `logps = sum_t log pi(y_t | x, y_<t)` (docs/design.md: the objective).
Paper: Song et al., "The Importance of Online Data: Understanding Preference Fine-tuning via Coverage",
arXiv 2406.01462 (HyPO, Algorithm 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss on offline pairs, with the IPO and conservative (label-smoothing) variants.

    With u = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
    - sigmoid (DPO, Rafailov et al. 2023 eq. 7):
      loss = -(1 - eps) * log sigmoid(beta * u) - eps * log sigmoid(-beta * u)   (eps = label_smoothing,
      cDPO; eps = 0 is plain DPO)
    - ipo (Azar et al. 2023 eq. 17): loss = (u - 1 / (2 * beta))^2, on sequence sums.
    Implicit rewards: beta * (policy_logps - ref_logps), detached.

    Shape: each input (B,) -> losses (B,), chosen_rewards (B,), rejected_rewards (B,)
    """
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    u = chosen_log_ratio - rejected_log_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(-beta * u)
    elif loss_type == "ipo":
        losses = (u - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    return losses, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


def preference_metrics(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair values of the metrics TRL logs for an offline loss (averaged by training, summed by the
    held-out evaluation): implicit rewards, whether the chosen one is higher, their margin, and the policy's
    log-probs (detached).

    Example: chosen_rewards [0.2, -0.1], rejected_rewards [0.1, 0.3] -> accuracies [1, 0], margins [0.1, -0.4].

    Shape: each input (B,) -> dict of (B,)
    """
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }


def leave_one_out_advantages(rewards: torch.Tensor, *, num_generations: int) -> torch.Tensor:
    """a_i = r_i - mean_{j != i} r_j within each group of `num_generations` samples of one prompt;
    with one sample per prompt there is no baseline (a_i = r_i).

    Samples of a prompt are contiguous: rows [g * k, (g + 1) * k) belong to prompt g.
    Example: r = [1, 2, 6] (k = 3) -> baselines [4, 3.5, 1.5] -> a = [-3, -1.5, 4.5].

    Shape: rewards (G * k,) -> (G * k,)
    """
    k = num_generations
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} samples do not split into groups of num_generations={k}")
    if k == 1:
        return rewards
    grouped = rewards.view(-1, k)  # (G, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (G, k)
    return (grouped - baseline).view(-1)


def kl_surrogate(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, num_generations: int
) -> torch.Tensor:
    """Surrogate loss whose gradient is an unbiased estimate of grad KL(pi || pi_ref)(x).

    For y_1..y_k ~ pi(.|x) (REINFORCE with a leave-one-out baseline; HyPO's online term):
      r_i = stopgrad(logp_pi(y_i|x) - logp_ref(y_i|x)),  a_i = r_i - mean_{j != i} r_j,
      loss_i = a_i * logp_pi(y_i|x).
    Its value is not the KL (use `kl_estimates` for that); only its gradient matters.
    Example: policy [-2, -4], ref [-3, -3] -> r = [1, -1], a = [2, -2], loss = [-4, 8].

    Shape: policy_logps (G * k,), ref_logps (G * k,) -> (G * k,)
    """
    rewards = (policy_logps - ref_logps).detach()  # (G * k,)
    advantages = leave_one_out_advantages(rewards, num_generations=num_generations)
    return advantages * policy_logps


def kl_estimates(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Schulman's k1, k2, k3 estimates of KL(pi || pi_ref) from samples y ~ pi (for logging only).

    With log_ratio = logp_pi(y) - logp_ref(y):
      k1 = log_ratio (unbiased), k2 = log_ratio^2 / 2 (biased, low variance),
      k3 = (exp(-log_ratio) - 1) + log_ratio (unbiased, >= 0).
    Used as a loss, k3 has the gradient of a different divergence: never differentiate these.
    Example: log_ratio = ln 2 -> k1 = 0.6931, k2 = 0.2402, k3 = -0.5 + 0.6931 = 0.1931.

    Shape: (N,), (N,) -> dict of (N,)
    """
    log_ratio = (policy_logps - ref_logps).detach()
    return {
        "k1": log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": torch.expm1(-log_ratio) + log_ratio,
    }
