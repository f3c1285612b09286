"""Training and exact metrics for the bandit lab: one loop for every method, branching in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from hypo.lab.bandit.problem import (
    Bandit,
    MethodSpec,
    Pairs,
    best_unseen,
    dpo_objective,
    exact_kl_objective,
    expected_reward,
    gather_pairs,
    mass_on,
    policy_logps,
    reverse_kl,
    sampled_kl_objective,
    win_rate,
)

METRICS = ("objective/kl", "reward", "reward_gain", "win_rate", "off_support_mass", "best_unseen_prob",
           "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class TrainSettings:
    """Optimizer settings shared by every method (full batch)."""

    steps: int = 400
    """Optimizer steps."""
    learning_rate: float = 0.05
    """Step size of Adam (or plain gradient descent)."""
    optimizer: Literal["adam", "gd"] = "adam"
    """Full-batch Adam or plain gradient descent."""
    log_every: int = 5
    """Record the exact metrics every this many steps (and at step 0)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "gd"):
            raise ValueError(f"optimizer must be 'adam' or 'gd', got {self.optimizer!r}")
        if self.steps < 1 or self.log_every < 1 or self.learning_rate <= 0:
            raise ValueError("steps and log_every must be >= 1 and learning_rate > 0")


class FullBatchOptimizer:
    """Adam (Kingma and Ba 2015, defaults 0.9 / 0.999 / 1e-8) or plain gradient descent on one tensor.
    Written out because torch.optim's first step imports torch._dynamo (seconds), which the lab's quick
    runs cannot afford; the arithmetic is Adam's, per coordinate, so instances stay independent."""

    def __init__(self, param: torch.Tensor, *, lr: float, kind: str = "adam") -> None:
        self.param, self.lr, self.kind, self.t = param, lr, kind, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if self.kind == "gd":
            self.param -= self.lr * grad
            return
        self.t += 1
        self.m.mul_(0.9).add_(grad, alpha=0.1)
        self.v.mul_(0.999).addcmul_(grad, grad, value=0.001)
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        self.param -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)

    def zero_grad(self) -> None:
        self.param.grad = None


def reward_model_loss(w: torch.Tensor, bandit: Bandit, pairs: Pairs, *, weight_decay: float) -> torch.Tensor:
    """Bradley-Terry (logistic) loss of r_hat = w . phi on the pairs plus weight_decay * |w|^2:
    mean over pairs of -log sigmoid(r_hat(x, y+) - r_hat(x, y-)) + weight_decay * |w|^2.

    Shape: w (I, d) -> (I,)
    """
    chosen, rejected = gather_pairs(torch.einsum("ixyd,id->ixy", bandit.features, w), pairs)
    return -F.logsigmoid(chosen - rejected).mean(-1) + weight_decay * (w**2).sum(-1)


def fit_reward_model(bandit: Bandit, pairs: Pairs, *, weight_decay: float = 1e-3, tol: float = 1e-10,
                     max_iter: int = 100) -> torch.Tensor:
    """The Bradley-Terry reward model r_hat = w . phi(x, y) on the same pairs and the policy's features
    (one-hot for tabular): the minimizer of `reward_model_loss`, an L2-regularized logistic regression
    on the feature differences z = phi(x, y+) - phi(x, y-) (the L2 term keeps w finite on separable
    data and makes the loss strictly convex). Solved by Newton's method with a backtracking line search,
    per instance, until every gradient coordinate is below `tol`:
        gradient = -mean_n sigmoid(-w . z_n) z_n + 2 weight_decay w,
        Hessian  =  mean_n sigmoid(w . z_n) sigmoid(-w . z_n) z_n z_n^T + 2 weight_decay I.

    Shape: -> w (I, d)
    """
    num_responses = bandit.features.shape[2]
    flat = bandit.features.flatten(1, 2)  # (I, X * Y, d)
    d = flat.shape[-1]

    def rows(index: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, index.unsqueeze(-1).expand(-1, -1, d))  # (I, N, d)

    z = rows(pairs.context * num_responses + pairs.chosen) - rows(pairs.context * num_responses + pairs.rejected)
    eye = torch.eye(d, dtype=flat.dtype)

    def loss(w: torch.Tensor) -> torch.Tensor:  # (I, d) -> (I,)
        return F.softplus(-torch.einsum("ind,id->in", z, w)).mean(-1) + weight_decay * (w**2).sum(-1)

    w = torch.zeros(flat.shape[0], d, dtype=flat.dtype)
    for _ in range(max_iter):
        margins = torch.einsum("ind,id->in", z, w)  # (I, N)
        grad = -(torch.sigmoid(-margins).unsqueeze(-1) * z).mean(1) + 2 * weight_decay * w  # (I, d)
        if grad.abs().max() < tol:
            return w
        curvature = torch.sigmoid(margins) * torch.sigmoid(-margins)  # (I, N)
        hessian = torch.einsum("in,ind,ine->ide", curvature, z, z) / z.shape[1] + 2 * weight_decay * eye
        step = -torch.linalg.solve(hessian, grad)  # (I, d), a descent direction
        size, current = torch.ones(w.shape[0], 1, dtype=w.dtype), loss(w)
        slope = (grad * step).sum(-1)  # (I,) < 0
        for _ in range(40):  # halve the step where it does not decrease the loss enough (Armijo, up to rounding)
            short = loss(w + size * step) > current + 1e-4 * size.squeeze(-1) * slope + 1e-12
            if not short.any():
                break
            size = torch.where(short.unsqueeze(-1), size / 2, size)
        w = w + size * step
    raise RuntimeError(f"reward model fit did not converge in {max_iter} Newton steps")


def rlhf_optimum(reward_weights: torch.Tensor, *, beta: float) -> torch.Tensor:
    """The maximizer of the KL-regularized RLHF objective E_pi r_hat - beta KL(pi || pi_ref) for a reward
    model in the policy's class, r_hat = w . phi: pi* = pi_ref exp(r_hat / beta) / Z, i.e. theta* = w / beta.

    Shape: reward_weights (I, d) -> theta (I, d)
    """
    return reward_weights / beta


def policy_metrics(theta: torch.Tensor, bandit: Bandit, pairs: Pairs) -> dict[str, torch.Tensor]:
    """Exact metrics of pi_theta, averaged over the uniform contexts of each instance.

    reward_gain = E pi r - E pi_ref r; off_support_mass = pi(y not covered); best_unseen_prob = pi of the
    best uncovered response; logps/* = mean log pi of the chosen / rejected responses of the pairs.
    Shape: theta (I, d) -> dict of (I,)
    """
    with torch.no_grad():
        logps = policy_logps(theta, bandit)
        reward = expected_reward(logps, bandit.reward).mean(-1)
        chosen, rejected = gather_pairs(logps, pairs)
        return {
            "objective/kl": reverse_kl(logps, bandit.ref_logps).mean(-1),
            "reward": reward,
            "reward_gain": reward - expected_reward(bandit.ref_logps, bandit.reward).mean(-1),
            "win_rate": win_rate(logps, bandit.ref_logps, bandit.reward).mean(-1),
            "off_support_mass": mass_on(logps, ~bandit.covered).mean(-1),
            "best_unseen_prob": mass_on(logps, best_unseen(bandit)).mean(-1),
            "logps/chosen": chosen.mean(-1),
            "logps/rejected": rejected.mean(-1),
        }


def world_metrics(theta: torch.Tensor, bandit: Bandit,
                  worlds: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Gold reward gain (E_pi r - E_ref r) and win rate against pi_ref of pi_theta under each world's gold
    reward r, averaged over the contexts of each instance. The policy and its KL do not depend on the world.

    Shape: theta (I, d), worlds {name: (I, X, Y)} -> {name: {"reward_gain": (I,), "win_rate": (I,)}}
    """
    with torch.no_grad():
        logps = policy_logps(theta, bandit)
        return {name: {"reward_gain": (expected_reward(logps, r) - expected_reward(bandit.ref_logps, r)).mean(-1),
                       "win_rate": win_rate(logps, bandit.ref_logps, r).mean(-1)}
                for name, r in worlds.items()}


def method_loss(theta: torch.Tensor, bandit: Bandit, pairs: Pairs, spec: MethodSpec, *,
                generator: torch.Generator) -> torch.Tensor:
    """The per-instance training loss of each method (the one place that branches on it).

    dpo: DPO on the pairs; hypo: DPO + kl_coef * exact E_x KL (paper eq. 6); hypo_sampled: the same with
    the sampled leave-one-out estimator. (rlhf has a closed-form optimum, `rlhf_optimum`.)
    Shape: theta (I, d) -> (I,)
    """
    if spec.method == "dpo":
        return dpo_objective(theta, bandit, pairs, beta=spec.beta)
    if spec.method == "hypo":
        return dpo_objective(theta, bandit, pairs, beta=spec.beta) + spec.kl_coef * exact_kl_objective(theta, bandit)
    if spec.method == "hypo_sampled":
        kl = sampled_kl_objective(theta, bandit, num_generations=spec.num_generations, generator=generator)
        return dpo_objective(theta, bandit, pairs, beta=spec.beta) + spec.kl_coef * kl
    raise ValueError(f"method {spec.method!r} has no loss")


def train_policy(bandit: Bandit, pairs: Pairs, spec: MethodSpec, settings: TrainSettings, *,
                 reward_weights: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train theta from 0 (the reference) with full-batch steps; instances are independent. rlhf is not
    trained by steps: its theta is the exact optimum for the fitted reward model `reward_weights`
    (`rlhf_optimum`), recorded at step 0 (the reference) and at the last step.

    Returns the final theta and the metric history. Shape: -> theta (I, d), history dict of (T, I)
    """
    generator = generator or torch.Generator().manual_seed(0)
    theta = torch.zeros(bandit.features.shape[0], bandit.features.shape[-1], dtype=torch.float64,
                        requires_grad=True)
    history: dict[str, list[torch.Tensor]] = {name: [] for name in ("step", *METRICS)}

    def record(step: int) -> None:
        history["step"].append(torch.full((theta.shape[0],), float(step), dtype=torch.float64))
        for name, value in policy_metrics(theta, bandit, pairs).items():
            history[name].append(value)

    record(0)
    if spec.method == "rlhf":
        if reward_weights is None:
            raise ValueError("rlhf needs a fitted reward model (reward_weights)")
        theta = rlhf_optimum(reward_weights, beta=spec.beta)
        record(settings.steps)
    elif spec.method != "reference":
        optimizer = FullBatchOptimizer(theta, lr=settings.learning_rate, kind=settings.optimizer)
        for step in range(1, settings.steps + 1):
            loss = method_loss(theta, bandit, pairs, spec, generator=generator)
            optimizer.zero_grad()
            loss.sum().backward()  # instances share no parameters: the sum trains each one on its own loss
            optimizer.step()
            if step % settings.log_every == 0 or step == settings.steps:
                record(step)
    return theta.detach(), {name: torch.stack(values) for name, values in history.items()}
