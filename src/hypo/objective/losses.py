"""Loss functions and KL estimates. Pure torch; every function returns per-example tensors.

`dpo_loss` is the offline term (any loss type of TRL's DPOTrainer, formulas in `hypo.objective.pair_losses`);
`kl_surrogate` the online term; `kl_estimates` logged estimates of the KL.

All inputs are sequence-level log-probabilities `logps = sum_t log pi(y_t | x, y_<t)` (docs/design.md: the objective).
Paper: Song et al., "The Importance of Online Data: Understanding Preference Fine-tuning via Coverage",
arXiv 2406.01462 (HyPO, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hypo.objective import pair_losses as pl
from hypo.objective.pair_losses import LENGTH_LOSSES, f_divergence_scores


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The offline loss on pairs: one loss type of TRL's DPOTrainer, or a weighted sum of several
    (`hypo.objective.pair_losses`; TRL 1.16's `loss_type` / `loss_weights`, default weight 1 each).

    With log-ratios chosen = policy_chosen - ref_chosen, rejected = policy_rejected - ref_rejected, sigmoid (DPO,
    Rafailov et al. 2023 eq. 7) is -log sigmoid(beta * (chosen - rejected)); label_smoothing makes it conservative
    DPO. `chosen_lengths` / `rejected_lengths` (completion tokens) are needed by ipo, sigmoid_norm and sft. The
    f-divergence (f-DPO) maps the log-ratios of the loss types built on their difference; the others read the
    log-ratios themselves (`hypo.config` refuses such a combination, as TRL does).
    Implicit rewards: beta * log-ratio, detached. The mean over pairs of the returned losses is TRL's loss.

    Example: loss_type ["sigmoid", "sft"], weights [1, 0.5], one pair with log-ratios 1 and -1 (beta 0.5), chosen
    logp -6 over 4 tokens -> 0.31326 + 0.5 * 1.5 = 1.06326.

    Shape: each input (B,) -> losses (B,), chosen_rewards (B,), rejected_rewards (B,)
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} weight(s) for {len(loss_types)} loss type(s)")
    if LENGTH_LOSSES & set(loss_types) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss types {sorted(LENGTH_LOSSES & set(loss_types))} need chosen_lengths and rejected_lengths")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    chosen_scores = f_divergence_scores(chosen_log_ratio, divergence=f_divergence_type, alpha=f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_log_ratio, divergence=f_divergence_type,
                                          alpha=f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores  # (B,)
    ratios, eps = (chosen_log_ratio, rejected_log_ratio), label_smoothing
    lengths = (chosen_lengths, rejected_lengths)
    formulas = {
        "sigmoid": lambda: pl.sigmoid_loss(delta, beta=beta, label_smoothing=eps),
        "hinge": lambda: pl.hinge_loss(delta, beta=beta),
        "ipo": lambda: pl.ipo_loss(chosen_scores, rejected_scores, *lengths, beta=beta),
        "exo_pair": lambda: pl.exo_pair_loss(delta, beta=beta, label_smoothing=eps),
        "nca_pair": lambda: pl.nca_pair_loss(*ratios, beta=beta),
        "robust": lambda: pl.robust_loss(delta, beta=beta, label_smoothing=eps),
        "bco_pair": lambda: pl.bco_pair_loss(*ratios, beta=beta),
        "sppo_hard": lambda: pl.sppo_hard_loss(*ratios, beta=beta),
        "aot": lambda: pl.aot_loss(policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps,
                                   beta=beta, label_smoothing=eps),
        "aot_unpaired": lambda: pl.aot_unpaired_loss(*ratios, beta=beta, label_smoothing=eps),
        "apo_zero": lambda: pl.apo_zero_loss(*ratios, beta=beta),
        "apo_down": lambda: pl.apo_down_loss(*ratios, beta=beta),
        "discopop": lambda: pl.discopop_loss(delta, beta=beta, tau=discopop_tau),
        "sft": lambda: pl.sft_loss(policy_chosen_logps, chosen_lengths),
        "sigmoid_norm": lambda: pl.sigmoid_norm_loss(chosen_scores, rejected_scores, *lengths, beta=beta),
    }
    unknown = [name for name in loss_types if name not in formulas]
    if unknown or not loss_types:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one or several of {', '.join(formulas)}")
    losses = sum(weight * formulas[name]() for name, weight in zip(loss_types, weights, strict=True))  # (B,)
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
