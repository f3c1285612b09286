"""Exact bandit math of the coverage lab: hand-computed KL / reward / win rate, the sampled HyPO gradient
against the exact KL gradient, DPO under global coverage, DPO vs HyPO under partial coverage, the
reward worlds (identical labels, scores by hand) and the converged reward model and RLHF optimum."""

import math

import pytest
import torch

from hypo.lab.bandit.problem import (
    Bandit,
    MethodSpec,
    Pairs,
    best_unseen,
    exact_kl_objective,
    expected_reward,
    mass_on,
    policy_logps,
    reverse_kl,
    sample_pairs,
    sampled_kl_objective,
    tabular_features,
    win_rate,
)
from hypo.lab.bandit.regimes import (
    REGIMES,
    Sizes,
    as_built_world,
    beyond_frontier,
    make_bandit_worlds,
    split_regime,
)
from hypo.lab.bandit.training import (
    FullBatchOptimizer,
    TrainSettings,
    fit_reward_model,
    reward_model_loss,
    rlhf_optimum,
    train_policy,
    world_metrics,
)

torch.set_num_threads(1)


def tiny_bandit(ref: list[float], reward: list[float], covered: list[bool]) -> Bandit:
    """One instance, one context, tabular features."""
    y = len(ref)
    return Bandit(tabular_features(1, 1, y), torch.tensor([[ref]], dtype=torch.float64).log(),
                  torch.tensor([[reward]], dtype=torch.float64), torch.tensor([[covered]]))


def test_exact_kl_reward_win_rate_and_masses_by_hand():
    """ref = [0.5, 0.5], theta = [ln 4, 0] -> pi ∝ [0.5 * 4, 0.5] = [2, 0.5] -> pi = [0.8, 0.2].
    KL = 0.8 ln(0.8 / 0.5) + 0.2 ln(0.2 / 0.5) = 0.8 * 0.470004 - 0.2 * 0.916291 = 0.192745.
    r = [1, 0]: E_pi r = 0.8. Win rate vs ref (ties half): 0.8 * (0.5 * 0.5 + 0.5 * 1) + 0.2 * (0.5 * 0 + 0.5 * 0.5)
    = 0.6 + 0.05 = 0.65. Only y0 is covered: off-support mass = pi(y1) = 0.2 = pi(best unseen)."""
    bandit = tiny_bandit([0.5, 0.5], [1.0, 0.0], [True, False])
    logps = policy_logps(torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64), bandit)
    assert logps.exp().flatten().tolist() == pytest.approx([0.8, 0.2])
    assert reverse_kl(logps, bandit.ref_logps).item() == pytest.approx(0.192745, abs=1e-6)
    assert expected_reward(logps, bandit.reward).item() == pytest.approx(0.8)
    assert win_rate(logps, bandit.ref_logps, bandit.reward).item() == pytest.approx(0.65)
    assert mass_on(logps, ~bandit.covered).item() == pytest.approx(0.2)
    assert best_unseen(bandit).flatten().tolist() == [False, True]
    assert win_rate(bandit.ref_logps, bandit.ref_logps, bandit.reward).item() == pytest.approx(0.5)


def test_sampled_hypo_gradient_matches_exact_kl_gradient_on_average():
    """2000 copies of one log-linear bandit, each with its own k = 4 samples per context: the mean of the
    kl_surrogate gradients matches autograd of the exact E_x KL (docs/design.md: the objective)."""
    generator = torch.Generator().manual_seed(0)
    one = make_bandit_worlds("linear-identified-bt", 1, generator, Sizes(num_contexts=2, num_responses=6))[0]
    copies = 2000
    bandit = Bandit(*(t.expand(copies, *t.shape[1:]) for t in (one.features, one.ref_logps, one.reward, one.covered)))
    theta0 = torch.randn(1, one.features.shape[-1], dtype=torch.float64, generator=generator)
    exact_theta = theta0.clone().requires_grad_(True)
    exact_kl_objective(exact_theta, one).sum().backward()
    theta = theta0.expand(copies, -1).clone().requires_grad_(True)
    sampled_kl_objective(theta, bandit, num_generations=4, generator=generator).sum().backward()
    mean_grad, stderr = theta.grad.mean(0), theta.grad.std(0) / copies**0.5
    assert exact_theta.grad.abs().max() > 0.1  # a real gradient, not zero
    assert ((mean_grad - exact_theta.grad[0]).abs() < 4 * stderr + 1e-3).all()


def test_dpo_on_global_coverage_recovers_the_bt_optimal_ordering():
    """All 5 responses covered, 4000 Bradley-Terry pairs: DPO's log-ratios order the responses like the
    gold reward, and beta * log-ratio differences match reward differences (pi* ∝ pi_ref exp(r / beta))."""
    generator = torch.Generator().manual_seed(1)
    reward = [1.0, -0.5, 0.3, 0.0, -1.2]
    bandit = tiny_bandit([0.1, 0.3, 0.2, 0.25, 0.15], reward, [True] * 5)
    pairs = sample_pairs(bandit, 4000, labels="bt", generator=generator)
    theta, _ = train_policy(bandit, pairs, MethodSpec("dpo", beta=1.0), TrainSettings(steps=400, log_every=400))
    log_ratio = (policy_logps(theta, bandit) - bandit.ref_logps).flatten()
    assert log_ratio.argsort().tolist() == torch.tensor(reward).argsort().tolist()
    gaps = log_ratio - log_ratio[3]  # relative to the response with reward 0
    assert gaps.tolist() == pytest.approx(reward, abs=0.2)


def test_partial_coverage_dpo_moves_mass_off_support_and_hypo_bounds_it():
    """ref = [0.01, 0.5, 0.49], y2 never in the data; pairs: y0 beats y1 8 times, y1 beats y0 twice.
    DPO's optimum (beta = 1) is theta0 - theta1 = ln 4, and the symmetric gradients give theta = [ln 2, -ln 2]:
    pi ∝ [0.02, 0.25, 0.49] -> off-support mass 0.49 / 0.76 = 0.6447 (reference: 0.49). Both responses in
    the data lose probability relative to y2 on net: the DPO loss cannot see y2. HyPO's KL term holds it near 0.49."""
    bandit = tiny_bandit([0.01, 0.5, 0.49], [1.0, 0.0, -2.0], [True, True, False])
    chosen = torch.tensor([[0] * 8 + [1] * 2])
    pairs = Pairs(torch.zeros_like(chosen), chosen, 1 - chosen)
    settings = TrainSettings(steps=600, learning_rate=0.1, log_every=600)
    _, dpo = train_policy(bandit, pairs, MethodSpec("dpo", beta=1.0), settings)
    _, hypo = train_policy(bandit, pairs, MethodSpec("hypo", beta=1.0, kl_coef=1.0), settings)
    assert dpo["off_support_mass"][0].item() == pytest.approx(0.49)
    assert dpo["off_support_mass"][-1].item() == pytest.approx(0.49 / 0.76, abs=1e-3)
    assert dpo["reward_gain"][-1].item() < 0  # the unseen response is the worst one
    assert hypo["off_support_mass"][-1].item() < 0.55
    assert hypo["objective/kl"][-1].item() < dpo["objective/kl"][-1].item()


@pytest.mark.parametrize("regime", ["tabular-partial-det", "linear-identified-bt", "linear-trap-det"])
def test_reward_model_fit_is_converged(regime):
    """The reward model is the minimizer of a strictly convex loss (logistic + L2): at the fitted w the
    autograd gradient of reward_model_loss is ~0 (Newton stops below 1e-10 per coordinate), and random
    perturbations only raise the loss. On separable (-det) data the L2 term keeps w finite."""
    generator = torch.Generator().manual_seed(11)
    bandit = make_bandit_worlds(regime, 3, generator)[0]
    pairs = sample_pairs(bandit, 128, labels=split_regime(regime)[1], generator=generator)
    w_hat = fit_reward_model(bandit, pairs, weight_decay=1e-3)
    w = w_hat.clone().requires_grad_(True)
    loss = reward_model_loss(w, bandit, pairs, weight_decay=1e-3)
    loss.sum().backward()
    assert w.grad.abs().max() < 1e-9
    assert w_hat.abs().max() > 0.5  # a real fit, not the starting point
    for _ in range(5):
        nudged = w_hat + 0.01 * torch.randn(w_hat.shape, generator=generator, dtype=torch.float64)
        assert (reward_model_loss(nudged, bandit, pairs, weight_decay=1e-3) > loss.detach()).all()


@pytest.mark.parametrize("regime", ["tabular-partial-bt", "linear-trap-bt"])
def test_rlhf_is_the_exact_optimum_of_its_objective(regime):
    """RLHF in the lab is theta* = w_hat / beta, the maximizer of E_pi r_hat - beta KL(pi || pi_ref) for
    r_hat = w_hat . phi: its policy equals pi_ref exp(r_hat / beta) / Z computed directly, the gradient of
    the objective there is ~0, and train_policy returns exactly it (no optimizer steps to converge)."""
    generator = torch.Generator().manual_seed(12)
    bandit = make_bandit_worlds(regime, 3, generator)[0]
    pairs = sample_pairs(bandit, 128, labels="bt", generator=generator)
    w_hat = fit_reward_model(bandit, pairs)
    reward_hat = torch.einsum("ixyd,id->ixy", bandit.features, w_hat)
    for beta in (0.1, 1.0):
        theta = rlhf_optimum(w_hat, beta=beta).requires_grad_(True)
        closed_form = torch.log_softmax(bandit.ref_logps + reward_hat / beta, dim=-1)
        assert torch.allclose(policy_logps(theta, bandit), closed_form, atol=1e-10)
        logps = policy_logps(theta, bandit)  # the RLHF objective, -(E_pi r_hat - beta KL(pi || pi_ref)), exactly
        (-(expected_reward(logps, reward_hat) - beta * reverse_kl(logps, bandit.ref_logps))).sum().backward()
        assert theta.grad.abs().max() < 1e-9
        trained, history = train_policy(bandit, pairs, MethodSpec("rlhf", beta=beta),
                                        TrainSettings(steps=400, log_every=5), reward_weights=w_hat)
        assert torch.equal(trained, theta.detach())
        assert history["step"][:, 0].tolist() == [0.0, 400.0]


def test_world_metrics_by_hand():
    """pi = [0.8, 0.2], pi_ref = [0.5, 0.5], only y0 covered. Two worlds agree on y0 (r = 1) and differ
    on the unseen y1: r1 = 0 -> gain 0.8 - 0.5 = +0.3, win rate 0.65 (first test); r1 = 2 -> E_pi r =
    0.8 + 0.4 = 1.2, E_ref r = 1.5, gain -0.3; y1 beats y0: win = pi(y1) ref(y0) + half of the ties
    (0.8 * 0.5 + 0.2 * 0.5) = 0.1 + 0.25 = 0.35."""
    bandit = tiny_bandit([0.5, 0.5], [1.0, 0.0], [True, False])
    worlds = {"low": bandit.reward, "high": torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)}
    scores = world_metrics(torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64), bandit, worlds)
    assert scores["low"]["reward_gain"].item() == pytest.approx(0.3)
    assert scores["low"]["win_rate"].item() == pytest.approx(0.65)
    assert scores["high"]["reward_gain"].item() == pytest.approx(-0.3)
    assert scores["high"]["win_rate"].item() == pytest.approx(0.35)


@pytest.mark.parametrize("regime", REGIMES)
def test_reward_worlds_agree_on_the_data_and_give_identical_labels(regime):
    """Every world of a regime has the same gold reward as the regime's own on every covered response,
    so the label probabilities are the same and pairs drawn with the same random stream are identical;
    off the data the partial-coverage worlds do differ. The regime's Bandit carries its own world."""
    bandit, worlds = make_bandit_worlds(regime, 6, torch.Generator().manual_seed(13))
    structure, labels = split_regime(regime)
    assert torch.equal(bandit.reward, worlds[as_built_world(regime)])
    if structure == "tabular-global":
        assert list(worlds) == ["as built"]
    else:
        assert list(worlds) == ["beyond -3", "beyond 0", "beyond +3", "unseen -1.5", "unseen +1.5"]
    reference_pairs = sample_pairs(bandit, 256, labels=labels, generator=torch.Generator().manual_seed(14))
    for name, reward in worlds.items():
        assert torch.equal(reward[bandit.covered], bandit.reward[bandit.covered]), name
        world = Bandit(bandit.features, bandit.ref_logps, reward, bandit.covered)
        pairs = sample_pairs(world, 256, labels=labels, generator=torch.Generator().manual_seed(14))
        for a, b in ((pairs.context, reference_pairs.context), (pairs.chosen, reference_pairs.chosen),
                     (pairs.rejected, reference_pairs.rejected)):
            assert torch.equal(a, b), name
        if name != as_built_world(regime):
            assert (reward[~bandit.covered] - bandit.reward[~bandit.covered]).abs().max() > 0.1, name


def test_trap_worlds_differ_only_in_the_hidden_weight():
    """linear-trap's hidden feature is `beyond` on the visible score; its worlds 'beyond a' put gold weight
    a on it (the regime is a = -3), so r(beyond a) - r(beyond -3) = (a + 3) * hidden."""
    bandit, worlds = make_bandit_worlds("linear-trap-bt", 4, torch.Generator().manual_seed(15))
    hidden = bandit.features[..., -1]
    visible = worlds["beyond 0"]
    assert torch.equal(hidden, beyond_frontier(visible, bandit.covered))
    assert torch.allclose(worlds["beyond +3"] - worlds["beyond -3"], 6.0 * hidden)
    assert torch.allclose(worlds["beyond -3"], visible - 3.0 * hidden)
    assert hidden.max() > 0


@pytest.mark.parametrize("regime", REGIMES)
def test_regimes_cover_as_documented(regime):
    """Partial coverage never covers the best response; the trap feature is 0 on every covered response."""
    bandit = make_bandit_worlds(regime, 5, torch.Generator().manual_seed(3))[0]
    structure, _ = split_regime(regime)
    assert bandit.ref_logps.exp().sum(-1).tolist() == [pytest.approx([1.0] * 4)] * 5
    if structure == "tabular-global":
        assert bandit.covered.all()
    else:
        assert (bandit.covered.sum(-1) == 8).all()
    if structure in ("tabular-partial", "linear-identified", "linear-misspec"):
        best = bandit.reward.argmax(-1, keepdim=True)
        assert not bandit.covered.gather(-1, best).any()
    if structure == "linear-trap":
        assert (bandit.features[..., -1][bandit.covered] == 0).all()


def test_trap_hypo_penalizes_the_unseen_feature_dpo_and_rlhf_do_not():
    """linear-trap: the last feature is 0 on every covered response, so the DPO and Bradley-Terry gradients
    have no component along it: DPO keeps theta_hidden = 0 and RLHF's optimum w_hat / beta has it 0 too.
    HyPO's KL gradient is the covariance under pi of the features with the log-ratio; the hidden feature
    grows with the extrapolated score, so HyPO learns theta_hidden < 0. That wins only in the world the
    regime is built in: with gold weight +3 on the hidden feature instead of -3 (the same pairs), DPO's
    extrapolation is rewarded and HyPO is behind. DPO also shows the 'both go down' effect: the chosen
    and rejected log-probs both fall while their margin grows."""
    generator = torch.Generator().manual_seed(5)
    bandit, worlds = make_bandit_worlds("linear-trap-bt", 6, generator)
    pairs = sample_pairs(bandit, 128, labels="bt", generator=generator)
    reward_weights = fit_reward_model(bandit, pairs)
    settings = TrainSettings(steps=300, log_every=300)
    dpo_theta, dpo = train_policy(bandit, pairs, MethodSpec("dpo", beta=0.3), settings)
    hypo_theta, _ = train_policy(bandit, pairs, MethodSpec("hypo", beta=0.3, kl_coef=0.1), settings)
    rlhf_theta, _ = train_policy(bandit, pairs, MethodSpec("rlhf", beta=1.0), settings,
                                 reward_weights=reward_weights)
    assert dpo_theta[:, -1].abs().max() < 1e-6  # its gradient is 0 up to rounding
    assert rlhf_theta[:, -1].abs().max() < 1e-9  # the reward model's hidden weight is 0
    assert (hypo_theta[:, -1] < -1).all()
    chosen, rejected = dpo["logps/chosen"], dpo["logps/rejected"]
    assert (chosen[-1] < chosen[0]).all() and (rejected[-1] < rejected[0]).all()
    assert ((chosen[-1] - rejected[-1]) > (chosen[0] - rejected[0])).all()
    dpo_gain = {w: m["reward_gain"].mean().item() for w, m in world_metrics(dpo_theta, bandit, worlds).items()}
    hypo_gain = {w: m["reward_gain"].mean().item() for w, m in world_metrics(hypo_theta, bandit, worlds).items()}
    assert dpo_gain["beyond -3"] < hypo_gain["beyond -3"]
    assert dpo_gain["beyond +3"] > hypo_gain["beyond +3"] + 1.0
    assert min(hypo_gain.values()) > min(dpo_gain.values())  # the worst world is kinder to HyPO


def test_full_batch_adam_first_steps():
    """Adam's first step is lr * g / |g| per coordinate (bias-corrected m / sqrt(v) = g / |g|): with lr = 0.1
    and g = [3, -0.5, 0] the parameter moves by [-0.1, +0.1, 0]. Gradient descent moves by -lr * g."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = FullBatchOptimizer(theta, lr=0.1)
    (theta * torch.tensor([3.0, -0.5, 0.0], dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert theta.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = FullBatchOptimizer(theta, lr=0.1, kind="gd")
    (theta * torch.tensor([3.0, -0.5], dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert theta.tolist() == pytest.approx([-0.3, 0.05])


def test_tabular_exact_hypo_under_adam_hardly_depends_on_kl_coef():
    """A property of the optimizer, documented in docs/coverage-lab.md: in tabular-partial, the only gradient
    on the parameter of an uncovered response is the KL term's; Adam divides each coordinate's step by its
    own gradient scale, so that term moves it at full step size however small kl_coef is. Exact HyPO with
    kl_coef = 1e-4 therefore ends about where kl_coef = 1e-2 does (low KL, mass moved off the data), far
    from DPO (kl_coef = 0), while plain gradient descent with the same kl_coef stays with DPO."""
    generator = torch.Generator().manual_seed(1)
    bandit = make_bandit_worlds("tabular-partial-bt", 6, generator)[0]
    pairs = sample_pairs(bandit, 128, labels="bt", generator=generator)
    adam, gd = TrainSettings(steps=400, log_every=400), TrainSettings(steps=400, learning_rate=1.0,
                                                                       optimizer="gd", log_every=400)

    def final(spec, settings):
        _, history = train_policy(bandit, pairs, spec, settings)
        return history["objective/kl"][-1].mean().item(), history["off_support_mass"][-1].mean().item()

    dpo_kl, dpo_off = final(MethodSpec("dpo", beta=0.1), adam)
    tiny_kl, tiny_off = final(MethodSpec("hypo", beta=0.1, kl_coef=1e-4), adam)
    small_kl, _ = final(MethodSpec("hypo", beta=0.1, kl_coef=1e-2), adam)
    assert dpo_kl > 2.5 and dpo_off < 0.05
    assert tiny_kl < 0.5 and tiny_off > 0.8  # kl_coef = 1e-4 already stops DPO's drift under Adam
    assert abs(tiny_kl - small_kl) < 0.1
    gd_dpo_kl, _ = final(MethodSpec("dpo", beta=0.1), gd)
    gd_tiny_kl, _ = final(MethodSpec("hypo", beta=0.1, kl_coef=1e-4), gd)
    assert gd_tiny_kl == pytest.approx(gd_dpo_kl, rel=0.01)
