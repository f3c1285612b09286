"""The offline losses on preference pairs: every loss type of TRL's DPOTrainer (TRL 1.16), as pure functions.

Notation (docs/design.md: the objective): `chosen_logratios = logp_pi(y+) - logp_ref(y+)` and
`rejected_logratios = logp_pi(y-) - logp_ref(y-)`, on sequence sums; `scores` are the log-ratios after the
f-divergence map (`f_divergence_scores`; the log-ratios themselves for the reverse KL, DPO's own), and
`delta = chosen_scores - rejected_scores`. Lengths count completion tokens. Each function returns one loss
per pair; `hypo.objective.losses.dpo_loss` picks and weights them. Formulas follow TRL 1.16's
`DPOTrainer._compute_loss` line for line (tests/test_trl_parity.py checks losses and gradients against it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LENGTH_LOSSES = frozenset({"ipo", "sigmoid_norm", "sft"})
"""The loss types that need the completion lengths (the names, the rules between options: `hypo.config`)."""
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(logratios: torch.Tensor, *, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) for the divergences of f-DPO (Wang et al. 2023, "Beyond Reverse KL", arXiv 2309.16240), in
    TRL 1.16's parameterization, from u = log(pi / pi_ref): reverse_kl u (DPO); forward_kl 1 - exp(-u);
    js_divergence log(2 t / (1 + t)) = log 2 + log sigmoid(u); alpha_divergence (exp((alpha - 1) u) - 1) / (alpha - 1),
    with (alpha - 1) u clamped at 80 (TRL's guard against overflow); alpha = 1 is the reverse KL.

    Example: u = ln 2 -> reverse_kl 0.6931, forward_kl 1 - 1/2 = 0.5, js_divergence ln 2 + ln(2/3) = ln(4/3) =
    0.2877, alpha_divergence (alpha 0.5): (2^-0.5 - 1) / -0.5 = 0.5858.

    Shape: (B,) -> (B,)
    """
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        exponent = ((alpha - 1.0) * logratios).float().clamp(max=80.0)
        return (torch.exp(exponent) - 1.0).to(logratios.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {divergence!r}; expected one of {F_DIVERGENCES}")


def per_token(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token averages: each sequence's score divided by its completion length (at least 1).

    Example: scores [3, -2], lengths [6, 0] -> [0.5, -2].

    Shape: (B,), (B,) -> (B,)
    """
    return scores / lengths.to(scores.dtype).clamp(min=1.0)


def sigmoid_loss(delta: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): -log sigmoid(beta * delta). With eps = label_smoothing
    > 0, conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the preference is flipped with
    probability eps, -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta). TRL 1.16 reads no
    label_smoothing here; with eps = 0 the two are the same.

    Example: delta 2, beta 0.5 -> -log sigmoid(1) = 0.31326; eps 0.1 -> 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326.

    Shape: (B,) -> (B,)
    """
    logits = beta * delta
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def hinge_loss(delta: torch.Tensor, *, beta: float) -> torch.Tensor:
    """SLiC's hinge (Zhao et al. 2023, arXiv 2305.10425, eq. 3 with margin 1 / beta): max(0, 1 - beta * delta).

    Example: beta 0.5: delta 2 -> 0; delta -1 -> 1.5.

    Shape: (B,) -> (B,)
    """
    return torch.relu(1 - beta * delta)


def ipo_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, *, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17, tau = beta) on per-token average log-ratios, as TRL
    computes it (the form the paper's results used, per TRL's note from the authors):
    (chosen / |y+| - rejected / |y-| - 1 / (2 beta))^2.

    Example: chosen 6 over 3 tokens, rejected -4 over 4 tokens, beta 0.5 -> (2 - (-1) - 1)^2 = 4.

    Shape: each (B,) -> (B,)
    """
    delta = per_token(chosen_scores, chosen_lengths) - per_token(rejected_scores, rejected_lengths)
    return (delta - 1 / (2 * beta)) ** 2


def exo_pair_loss(delta: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16): KL(q || p) over {chosen, rejected} with
    q = (sigmoid(beta * delta), sigmoid(-beta * delta)) and the smoothed labels p = (1 - eps, eps), eps > 0.

    Example: delta 0, eps 0.5 -> q = p = (0.5, 0.5) -> 0; delta 0, eps 0.1 -> 0.5 ln(0.5 / 0.9) + 0.5 ln(0.5 / 0.1)
    = 0.5108.

    Shape: (B,) -> (B,)
    """
    logits = beta * delta
    chosen_q, rejected_q = torch.sigmoid(logits), torch.sigmoid(-logits)
    return chosen_q * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + \
        rejected_q * (F.logsigmoid(-logits) - math.log(label_smoothing))


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv 2402.05369, pairwise form): with r = beta * logratio,
    -log sigmoid(r+) - 1/2 log sigmoid(-r+) - 1/2 log sigmoid(-r-).

    Example: r+ = r- = 0 -> 2 ln 2 = 1.3863.

    Shape: (B,), (B,) -> (B,)
    """
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust_loss(delta: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 7), unbiased under labels flipped with probability
    eps < 1/2: ((1 - eps) * -log sigmoid(beta * delta) - eps * -log sigmoid(-beta * delta)) / (1 - 2 eps).

    Example: delta 2, beta 0.5, eps 0.1 -> (0.9 * 0.31326 - 0.1 * 1.31326) / 0.8 = 0.18826.

    Shape: (B,) -> (B,)
    """
    logits = beta * delta
    clean, flipped = -(1 - label_smoothing) * F.logsigmoid(logits), -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656): chosen and rejected as two binary classifications,
    -log sigmoid(beta * chosen) - log sigmoid(-beta * rejected). As in TRL 1.16 there is no reward shift (the
    paper's running mean of rewards), so the loss needs no state across steps.

    Example: chosen 0, rejected 0 -> 2 ln 2 = 1.3863.

    Shape: (B,), (B,) -> (B,)
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P = 1 for the chosen and 0
    for the rejected): (chosen - 1 / (2 beta))^2 + (rejected + 1 / (2 beta))^2.

    Example: beta 0.5: chosen 1, rejected -1 -> 0; chosen 0, rejected 0 -> 1 + 1 = 2.

    Shape: (B,), (B,) -> (B,)
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(policy_margins: torch.Tensor, ref_margins: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    arXiv 2406.05882): the batch's policy margins logp_pi(y+) - logp_pi(y-) and reference margins are each sorted,
    then matched by rank in the (conservative) sigmoid loss of their difference. Depends on the whole batch.

    Example: policy margins [3, -1], reference [0, 2], beta 1 -> sorted [-1, 3] and [0, 2] -> deltas [-1, 1]
    -> [-log sigmoid(-1), -log sigmoid(1)] = [1.31326, 0.31326].

    Shape: (B,), (B,) -> (B,), in rank order
    """
    delta = torch.sort(policy_margins, dim=0).values - torch.sort(ref_margins, dim=0).values
    return sigmoid_loss(delta, beta=beta, label_smoothing=label_smoothing)


def aot_unpaired_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): the batch's chosen log-ratios and rejected log-ratios
    are each sorted and matched by rank in the (conservative) sigmoid loss of their difference.

    Example: chosen [1, -2], rejected [0, -1], beta 1 -> sorted [-2, 1] and [-1, 0] -> deltas [-1, 1]
    -> [1.31326, 0.31326].

    Shape: (B,), (B,) -> (B,), in rank order
    """
    delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
    return sigmoid_loss(delta, beta=beta, label_smoothing=label_smoothing)


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv 2408.06266, eq. 7), for chosen
    answers better than the model's own: raise the chosen, lower the rejected,
    1 - sigmoid(beta * chosen) + sigmoid(beta * rejected).

    Example: chosen 0, rejected 0 -> 1 - 0.5 + 0.5 = 1.

    Shape: (B,), (B,) -> (B,)
    """
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8), for chosen answers worse than the model's own:
    lower both, the rejected more, sigmoid(beta * chosen) + 1 - sigmoid(beta * (chosen - rejected)).

    Example: chosen 0, rejected 0 -> 0.5 + 1 - 0.5 = 1.

    Shape: (B,), (B,) -> (B,)
    """
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(delta: torch.Tensor, *, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024, arXiv 2406.08414, eq. 5): with z = beta * delta and m = sigmoid(z / tau), the blend
    (1 - m) * -log sigmoid(z) + m * exp(-z) of the logistic and exponential losses.

    Example: delta 0 -> z 0, m 0.5 -> 0.5 ln 2 + 0.5 = 0.84657.

    Shape: (B,) -> (B,)
    """
    logits = beta * delta
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen completions' negative log-likelihood per token over the whole batch (the NLL term of RPO,
    Pang et al. 2024, arXiv 2404.19733, eq. 1, with `loss_weights` as its alpha), repeated for every pair as TRL
    does: -sum(logp_pi(y+)) / sum(|y+|). Depends on the whole batch.

    Example: chosen logps [-6, -2] over [4, 4] tokens -> 8 / 8 = 1 for both pairs.

    Shape: (B,), (B,) -> (B,)
    """
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().to(policy_chosen_logps.dtype).clamp(min=1.0)
    return nll.expand(policy_chosen_logps.shape[0])


def sigmoid_norm_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
                      rejected_lengths: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Length-normalized DPO (TRL's sigmoid_norm; the normalization of SimPO, Meng et al. 2024, arXiv 2405.14734,
    eq. 4, kept with the reference): -log sigmoid(beta * (chosen / |y+| - rejected / |y-|)).

    Example: chosen 6 over 3 tokens, rejected -4 over 4 tokens, beta 0.5 -> -log sigmoid(1.5) = 0.20141.

    Shape: each (B,) -> (B,)
    """
    delta = per_token(chosen_scores, chosen_lengths) - per_token(rejected_scores, rejected_lengths)
    return -F.logsigmoid(beta * delta)


def ld_token_weights(chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, *,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in DPO", arXiv 2409.06411): in each pair, the tokens of a
    completion beyond the length of the shorter one count alpha times in its sequence log-prob (for policy and
    reference alike); the first min(|y+|, |y-|) tokens count fully. alpha = 1 is DPO, alpha = 0 drops the excess.

    Example: chosen mask [1, 1, 1, 0], rejected [1, 1, 0] (lengths 3 and 2), alpha 0.5 -> chosen weights
    [1, 1, 0.5, 0], rejected [1, 1, 0].

    Shape: masks (B, C), (B, R) -> weights (B, C), (B, R), float32
    """
    shared = torch.minimum(chosen_mask.sum(dim=-1), rejected_mask.sum(dim=-1)).unsqueeze(-1)  # (B, 1)

    def weights(mask: torch.Tensor) -> torch.Tensor:
        position = mask.cumsum(dim=-1)  # (B, T): 1, 2, ... along the completion tokens
        return mask.float() * torch.where(position <= shared, 1.0, alpha)

    return weights(chosen_mask), weights(rejected_mask)
