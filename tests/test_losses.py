"""Numeric tests of the loss functions, with the arithmetic in each docstring, and the gradient tests
that decide the KL estimator (docs/design.md: the objective)."""

import math

import pytest
import torch

from hypo.objective.losses import dpo_loss, kl_estimates, kl_surrogate, leave_one_out_advantages


def test_dpo_sigmoid_values():
    """u = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta = 0.5 -> h = 1; loss = -log sigmoid(1) = 0.31326;
    rewards: 0.5 * 1 = 0.5 (chosen), 0.5 * -1 = -0.5 (rejected)."""
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert chosen.item() == pytest.approx(0.5)
    assert rejected.item() == pytest.approx(-0.5)


def test_dpo_label_smoothing_values():
    """h = 1, eps = 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262."""
    losses, _, _ = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
        beta=0.5, label_smoothing=0.1,
    )
    assert losses.item() == pytest.approx(0.413262, abs=1e-6)


def test_dpo_ipo_values_are_on_per_token_averages():
    """TRL's IPO: log-ratios divided by completion lengths. Pair 1: u+ = -1 - -2 = 1 over 2 tokens, u- = -3 - -2 = -1
    over 1 token -> 0.5 - (-1) = 1.5; beta 0.5 -> (1.5 - 1)^2 = 0.25. Pair 2: u+ = 0, u- = -1 over 4 tokens -> 0.25
    -> (0.25 - 1)^2 = 0.5625. On sequence sums (the form before) pair 1 would give (2 - 1)^2 = 1."""
    losses, _, _ = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]),
        beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([1, 4]),
    )
    assert losses.tolist() == pytest.approx([0.25, 0.5625])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5, loss_type="ipo")


def test_dpo_per_example_and_gradient_sign():
    """The loss is per example and its gradient raises chosen and lowers rejected log-probs."""
    chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -4.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0]), beta=0.1)
    assert losses.shape == (2,)
    assert losses[0].item() == pytest.approx(math.log(2.0))  # u = 0 -> -log sigmoid(0) = log 2
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="hinge2")
    with pytest.raises(ValueError, match="loss_weights has 1 weight"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1,
                 loss_type=["sigmoid", "hinge"], loss_weights=[1.0])


def test_leave_one_out_advantages_values():
    """r = [1, 2, 6 | 0, 0, 3]; baselines [(2+6)/2, (1+6)/2, (1+2)/2 | 1.5, 1.5, 0]
    -> a = [-3, -1.5, 4.5 | -1.5, -1.5, 3]; with k = 1 there is no baseline."""
    a = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), num_generations=3)
    assert a.tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert leave_one_out_advantages(torch.tensor([2.0, -1.0]), num_generations=1).tolist() == [2.0, -1.0]
    with pytest.raises(ValueError, match="num_generations"):
        leave_one_out_advantages(torch.zeros(5), num_generations=2)


def test_kl_surrogate_values():
    """policy [-2, -4], ref [-3, -3] -> r = [1, -1]; a = [1 - (-1), -1 - 1] = [2, -2];
    loss = a * policy = [-4, 8]; gradient wrt policy logps = a = [2, -2] (r is stop-gradient)."""
    policy = torch.tensor([-2.0, -4.0], requires_grad=True)
    loss = kl_surrogate(policy, torch.tensor([-3.0, -3.0]), num_generations=2)
    assert loss.tolist() == pytest.approx([-4.0, 8.0])
    loss.sum().backward()
    assert policy.grad.tolist() == pytest.approx([2.0, -2.0])


def test_kl_estimates_values():
    """log_ratio = ln 2: k1 = 0.693147, k2 = 0.240227, k3 = (1/2 - 1) + ln 2 = 0.193147; log_ratio = 0: all 0."""
    est = kl_estimates(torch.tensor([math.log(2.0), -1.0]), torch.tensor([0.0, -1.0]))
    assert est["k1"].tolist() == pytest.approx([0.693147, 0.0], abs=1e-6)
    assert est["k2"].tolist() == pytest.approx([0.240227, 0.0], abs=1e-6)
    assert est["k3"].tolist() == pytest.approx([0.193147, 0.0], abs=1e-6)


# --- gradient tests on a categorical "policy": softmax over K responses --------------------------------

K = 6
NUM_PROMPTS = 40_000  # groups of k samples; the estimator's standard error is ~0.005 per coordinate


def _categorical_setup():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(K, generator=gen)
    ref_logits = torch.randn(K, generator=gen)
    return theta, torch.log_softmax(ref_logits, dim=0)


def _exact_grad(theta, fn):
    theta = theta.clone().requires_grad_(True)
    fn(torch.log_softmax(theta, dim=0)).backward()
    return theta.grad


def _reverse_kl(logp, ref_logp):
    return (logp.exp() * (logp - ref_logp)).sum()


def _forward_kl(logp, ref_logp):
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def _sampled_grad(theta, ref_logp, k, loss_fn, seed=1):
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, dim=0)
    gen = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(logp.detach().exp(), NUM_PROMPTS * k, replacement=True, generator=gen)
    loss_fn(logp[samples], ref_logp[samples], k).mean().backward()
    return theta.grad


@pytest.mark.parametrize("k", [1, 2, 4])
def test_kl_surrogate_gradient_matches_exact_reverse_kl(k):
    """Average gradient of the surrogate over on-policy samples == autograd of the exact KL(pi || pi_ref)."""
    theta, ref_logp = _categorical_setup()
    exact = _exact_grad(theta, lambda logp: _reverse_kl(logp, ref_logp))
    sampled = _sampled_grad(theta, ref_logp, k, lambda p, r, kk: kl_surrogate(p, r, num_generations=kk))
    assert exact.abs().max() > 0.1  # a gradient worth matching
    tol = 0.03 if k == 1 else 0.015  # no baseline: higher variance
    assert torch.allclose(sampled, exact, atol=tol), (sampled, exact)


def test_kl_estimates_cannot_become_a_loss():
    """Schulman's k1 and k3 are logged estimates only: hypo's `kl_estimates` returns them detached, so neither
    can be differentiated by accident. Each would be the wrong loss (docs/design.md, pitfalls): k1 = logp - logp_ref
    has gradient E_pi[grad logp] = 0, no regularization at all; k3 has the gradient of the forward KL
    (E_pi[(1 - q/p) grad logp] = -sum q grad log p). The same formulas, differentiated, show both."""
    policy = torch.tensor([-2.0, -4.0], requires_grad=True)
    estimates = kl_estimates(policy, torch.tensor([-3.0, -3.0]))
    assert not any(value.requires_grad for value in estimates.values())
    theta, ref_logp = _categorical_setup()
    reverse = _exact_grad(theta, lambda logp: _reverse_kl(logp, ref_logp))
    forward = _exact_grad(theta, lambda logp: _forward_kl(logp, ref_logp))
    k1_loss = _sampled_grad(theta, ref_logp, 1, lambda p, r, _k: p - r)
    k3_loss = _sampled_grad(theta, ref_logp, 1, lambda p, r, _k: torch.expm1(r - p) + (p - r))
    assert k1_loss.abs().max() < 0.01 and reverse.abs().max() > 0.1
    assert torch.allclose(k3_loss, forward, atol=0.03) and (k3_loss - reverse).abs().max() > 0.1


def test_kl_surrogate_is_neither_pitfall():
    """hypo's surrogate on the same samples follows the reverse KL, and is far from both wrong gradients
    above: zero (the differentiated log-ratio) and the forward KL's (the differentiated k3)."""
    theta, ref_logp = _categorical_setup()
    forward = _exact_grad(theta, lambda logp: _forward_kl(logp, ref_logp))
    ours = _sampled_grad(theta, ref_logp, 2, lambda p, r, k: kl_surrogate(p, r, num_generations=k))
    assert ours.abs().max() > 0.1
    assert (ours - forward).abs().max() > 0.1
