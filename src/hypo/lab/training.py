"""Training and exact metrics for the bandit lab: one loop for every method, branching in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from hypo.lab.bandit import (
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
    rlhf_objective,
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


def fit_reward_model(bandit: Bandit, pairs: Pairs, *, steps: int = 300, lr: float = 0.05,
                     weight_decay: float = 1e-3) -> torch.Tensor:
    """Bradley-Terry reward model r_hat = w . phi(x, y) on the same pairs and the policy's features
    (one-hot for tabular), fitted by full-batch Adam on the mean -log sigmoid(r_hat(y+) - r_hat(y-))
    plus weight_decay * |w|^2 (the L2 term keeps w finite on separable data).

    Shape: -> r_hat (I, X, Y)
    """
    w = torch.zeros(bandit.features.shape[0], bandit.features.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = FullBatchOptimizer(w, lr=lr)
    for _ in range(steps):
        reward_hat = torch.einsum("ixyd,id->ixy", bandit.features, w)
        chosen, rejected = gather_pairs(reward_hat, pairs)
        loss = -F.logsigmoid(chosen - rejected).mean(-1) + weight_decay * (w**2).sum(-1)  # (I,)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return torch.einsum("ixyd,id->ixy", bandit.features, w.detach())


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


def method_loss(theta: torch.Tensor, bandit: Bandit, pairs: Pairs, spec: MethodSpec, *,
                reward_hat: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The per-instance training loss of each method (the one place that branches on it).

    dpo: DPO on the pairs; hypo: DPO + kl_coef * exact E_x KL (paper eq. 6); hypo_sampled: the same with
    the sampled leave-one-out estimator; rlhf: exact KL-regularized objective on the fitted reward model.
    Shape: theta (I, d) -> (I,)
    """
    if spec.method == "dpo":
        return dpo_objective(theta, bandit, pairs, beta=spec.beta)
    if spec.method == "hypo":
        return dpo_objective(theta, bandit, pairs, beta=spec.beta) + spec.kl_coef * exact_kl_objective(theta, bandit)
    if spec.method == "hypo_sampled":
        kl = sampled_kl_objective(theta, bandit, num_generations=spec.num_generations, generator=generator)
        return dpo_objective(theta, bandit, pairs, beta=spec.beta) + spec.kl_coef * kl
    if spec.method == "rlhf":
        if reward_hat is None:
            raise ValueError("rlhf needs a fitted reward model (reward_hat)")
        return rlhf_objective(theta, bandit, reward_hat, beta=spec.beta)
    raise ValueError(f"method {spec.method!r} has no loss")


def train_policy(bandit: Bandit, pairs: Pairs, spec: MethodSpec, settings: TrainSettings, *,
                 reward_hat: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train theta from 0 (the reference) with full-batch steps; instances are independent.

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
    if spec.method != "reference":
        optimizer = FullBatchOptimizer(theta, lr=settings.learning_rate, kind=settings.optimizer)
        for step in range(1, settings.steps + 1):
            loss = method_loss(theta, bandit, pairs, spec, reward_hat=reward_hat, generator=generator)
            optimizer.zero_grad()
            loss.sum().backward()  # instances share no parameters: the sum trains each one on its own loss
            optimizer.step()
            if step % settings.log_every == 0 or step == settings.steps:
                record(step)
    return theta.detach(), {name: torch.stack(values) for name, values in history.items()}
