"""Numeric tests of every offline loss type (hypo.objective.pair_losses) and of their combination in `dpo_loss`,
with the arithmetic in each docstring. TRL's own code is the reference in tests/test_trl_parity.py."""

import math

import pytest
import torch

from hypo.config import LOSS_TYPES
from hypo.objective import pair_losses as pl
from hypo.objective.losses import dpo_loss

T = torch.tensor
SOFTPLUS_1, SOFTPLUS_MINUS_1 = math.log1p(math.exp(1.0)), math.log1p(math.exp(-1.0))  # 1.31326, 0.31326


def test_f_divergence_scores():
    """u = ln 2: reverse_kl ln 2; forward_kl 1 - 1/2 = 0.5; js_divergence ln 2 + ln(2/3) = ln(4/3);
    alpha_divergence (alpha 0.5) (2^-0.5 - 1) / -0.5 = 0.585786; alpha 1 falls back to the reverse KL."""
    u = T([math.log(2.0)])
    assert pl.f_divergence_scores(u).item() == pytest.approx(math.log(2.0))
    assert pl.f_divergence_scores(u, divergence="forward_kl").item() == pytest.approx(0.5)
    assert pl.f_divergence_scores(u, divergence="js_divergence").item() == pytest.approx(math.log(4 / 3))
    assert pl.f_divergence_scores(u, divergence="alpha_divergence", alpha=0.5).item() == pytest.approx(0.585786,
                                                                                                       abs=1e-6)
    assert pl.f_divergence_scores(u, divergence="alpha_divergence", alpha=1.0).item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="f_divergence_type"):
        pl.f_divergence_scores(u, divergence="hellinger")


def test_per_token():
    """[3, -2] over [6, 0] tokens -> [0.5, -2] (a length of 0 counts as 1)."""
    assert pl.per_token(T([3.0, -2.0]), T([6, 0])).tolist() == [0.5, -2.0]


def test_sigmoid_and_conservative_sigmoid():
    """delta 2, beta 0.5 -> softplus(-1) = 0.313262; eps 0.1 -> 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262."""
    assert pl.sigmoid_loss(T([2.0]), beta=0.5).item() == pytest.approx(SOFTPLUS_MINUS_1)
    assert pl.sigmoid_loss(T([2.0]), beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.413262, abs=1e-6)


def test_hinge():
    """beta 0.5: delta 2 -> max(0, 1 - 1) = 0; delta -1 -> 1 + 0.5 = 1.5."""
    assert pl.hinge_loss(T([2.0, -1.0]), beta=0.5).tolist() == [0.0, 1.5]


def test_ipo():
    """chosen 6 / 3 tokens = 2, rejected -4 / 4 tokens = -1, beta 0.5 -> (2 + 1 - 1)^2 = 4."""
    assert pl.ipo_loss(T([6.0]), T([-4.0]), T([3]), T([4]), beta=0.5).item() == pytest.approx(4.0)


def test_exo_pair():
    """delta 0: q = (0.5, 0.5); eps 0.5 -> KL to (0.5, 0.5) = 0; eps 0.1 -> 0.5 ln(0.5 / 0.9) + 0.5 ln(0.5 / 0.1)
    = -0.293893 + 0.804719 = 0.510826."""
    assert pl.exo_pair_loss(T([0.0]), beta=0.5, label_smoothing=0.5).item() == pytest.approx(0.0, abs=1e-7)
    assert pl.exo_pair_loss(T([0.0]), beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.510826, abs=1e-6)


def test_nca_pair():
    """r+ = r- = 0 -> ln 2 + ln 2 / 2 + ln 2 / 2 = 2 ln 2; r+ = 2 (log-ratio 4, beta 0.5), r- = 0 ->
    softplus(-2) + softplus(2) / 2 + ln 2 / 2 = 0.126928 + 1.063464 + 0.346574 = 1.536966."""
    assert pl.nca_pair_loss(T([0.0]), T([0.0]), beta=0.5).item() == pytest.approx(2 * math.log(2.0))
    assert pl.nca_pair_loss(T([4.0]), T([0.0]), beta=0.5).item() == pytest.approx(1.536966, abs=1e-6)


def test_robust():
    """delta 2, beta 0.5, eps 0.1 -> (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = 0.188262."""
    assert pl.robust_loss(T([2.0]), beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.188262, abs=1e-6)


def test_bco_pair():
    """0, 0 -> 2 ln 2; chosen 2, rejected -2, beta 0.5 -> 2 softplus(-1) = 0.626523."""
    assert pl.bco_pair_loss(T([0.0]), T([0.0]), beta=0.5).item() == pytest.approx(2 * math.log(2.0))
    assert pl.bco_pair_loss(T([2.0]), T([-2.0]), beta=0.5).item() == pytest.approx(2 * SOFTPLUS_MINUS_1)


def test_sppo_hard():
    """beta 0.5, 1 / (2 beta) = 1: (1, -1) -> 0; (0, 0) -> 1 + 1 = 2."""
    assert pl.sppo_hard_loss(T([1.0, 0.0]), T([-1.0, 0.0]), beta=0.5).tolist() == [0.0, 2.0]


def test_aot_sorts_the_batch():
    """policy margins [3, -1] and reference [0, 2] sorted: [-1, 3] - [0, 2] = [-1, 1] -> [softplus(1), softplus(-1)];
    unsorted (pair by pair) the deltas would be [3, -3]."""
    losses = pl.aot_loss(T([3.0, -1.0]), T([0.0, 2.0]), beta=1.0)
    assert losses.tolist() == pytest.approx([SOFTPLUS_1, SOFTPLUS_MINUS_1])


def test_aot_unpaired_sorts_each_side():
    """chosen [1, -2] and rejected [0, -1] sorted: [-2, 1] - [-1, 0] = [-1, 1]; eps 0.1 on delta -1:
    0.9 * 1.313262 + 0.1 * 0.313262 = 1.213262."""
    assert pl.aot_unpaired_loss(T([1.0, -2.0]), T([0.0, -1.0]), beta=1.0).tolist() == pytest.approx(
        [SOFTPLUS_1, SOFTPLUS_MINUS_1])
    smoothed = pl.aot_unpaired_loss(T([1.0, -2.0]), T([0.0, -1.0]), beta=1.0, label_smoothing=0.1)
    assert smoothed[0].item() == pytest.approx(1.213262, abs=1e-6)


def test_apo_zero_and_apo_down():
    """(0, 0) -> zero: 1 - 0.5 + 0.5 = 1; down: 0.5 + 1 - 0.5 = 1. chosen 2, rejected -2, beta 0.5:
    zero 1 - s(1) + s(-1) = 2 s(-1) = 0.537883; down s(1) + 1 - s(2) = 0.731059 + 1 - 0.880797 = 0.850261."""
    assert pl.apo_zero_loss(T([0.0, 2.0]), T([0.0, -2.0]), beta=0.5).tolist() == pytest.approx([1.0, 0.537883],
                                                                                              abs=1e-6)
    assert pl.apo_down_loss(T([0.0, 2.0]), T([0.0, -2.0]), beta=0.5).tolist() == pytest.approx([1.0, 0.850261],
                                                                                              abs=1e-6)


def test_discopop():
    """delta 0 -> z 0, m 0.5 -> 0.5 ln 2 + 0.5 = 0.846574; delta 2, beta 0.5, tau 0.05 -> z 1, m = s(20) = 1 - 2.1e-9:
    almost exp(-1) = 0.367879."""
    assert pl.discopop_loss(T([0.0]), beta=0.5, tau=0.05).item() == pytest.approx(0.846574, abs=1e-6)
    assert pl.discopop_loss(T([2.0]), beta=0.5, tau=0.05).item() == pytest.approx(math.exp(-1.0), abs=1e-6)


def test_sft_is_the_batch_token_mean_for_every_pair():
    """chosen logps [-6, -2] over [4, 4] tokens -> 8 / 8 = 1 for both pairs (not the mean of 1.5 and 0.5 per pair,
    which is also 1 here, so a second batch: [-6, -2] over [2, 6] -> 1, where per-pair means give (3 + 1/3) / 2)."""
    assert pl.sft_loss(T([-6.0, -2.0]), T([4, 4])).tolist() == [1.0, 1.0]
    assert pl.sft_loss(T([-6.0, -2.0]), T([2, 6])).tolist() == [1.0, 1.0]


def test_sigmoid_norm():
    """6 / 3 - (-4 / 4) = 3, beta 0.5 -> softplus(-1.5) = 0.201413."""
    assert pl.sigmoid_norm_loss(T([6.0]), T([-4.0]), T([3]), T([4]), beta=0.5).item() == pytest.approx(0.201413,
                                                                                                       abs=1e-6)


def test_dpo_loss_sums_weighted_loss_types():
    """sigmoid + 0.5 sft on log-ratios 1 / -1 (beta 0.5, delta 2): 0.313262 + 0.5 * 6 / 4 = 1.063262; the weights
    default to 1: 0.313262 + 1.5; the rewards are beta * log-ratio whatever the loss."""
    args = (T([-6.0]), T([-3.0]), T([-7.0]), T([-2.0]))
    lengths = {"chosen_lengths": T([4]), "rejected_lengths": T([2])}
    losses, chosen, rejected = dpo_loss(*args, beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                        **lengths)
    assert losses.item() == pytest.approx(SOFTPLUS_MINUS_1 + 0.75)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    unweighted, _, _ = dpo_loss(*args, beta=0.5, loss_type=["sigmoid", "sft"], **lengths)
    assert unweighted.item() == pytest.approx(SOFTPLUS_MINUS_1 + 1.5)


def test_dpo_loss_applies_the_f_divergence_to_the_log_ratios():
    """forward_kl: chosen log-ratio ln 2 -> 0.5, rejected -ln 2 -> 1 - 2 = -1, delta 1.5, beta 1 -> softplus(-1.5);
    the rewards stay beta * log-ratio."""
    losses, chosen, _ = dpo_loss(T([math.log(2.0)]), T([-math.log(2.0)]), T([0.0]), T([0.0]), beta=1.0,
                                 f_divergence_type="forward_kl")
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert chosen.item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_configured_loss_type_is_computed_and_differentiable(loss_type):
    """Each name the config accepts has a formula; its gradient reaches the policy log-probs and no reference one."""
    policy_chosen = T([-5.0, -7.0, -4.0], requires_grad=True)
    policy_rejected = T([-6.0, -5.0, -8.0], requires_grad=True)
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, T([-5.5, -6.0, -5.0]), T([-5.0, -6.5, -7.0]), beta=0.3,
                            loss_type=loss_type, label_smoothing=0.1 if loss_type == "exo_pair" else 0.0,
                            chosen_lengths=T([3, 4, 2]), rejected_lengths=T([2, 5, 4]))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    losses.mean().backward()
    assert policy_chosen.grad.abs().sum() > 0


def test_ld_token_weights():
    """chosen mask [1, 1, 1, 0], rejected [1, 1, 0] (lengths 3 and 2), alpha 0.5 -> chosen [1, 1, 0.5, 0],
    rejected [1, 1, 0]; second pair lengths 1 and 3 -> chosen [1, 0, 0, 0], rejected [1, 0.5, 0.5]."""
    chosen, rejected = pl.ld_token_weights(T([[1, 1, 1, 0], [1, 0, 0, 0]]), T([[1, 1, 0], [1, 1, 1]]), alpha=0.5)
    assert chosen.tolist() == [[1.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert rejected.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.5, 0.5]]
