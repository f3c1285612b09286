"""`hypo lab bandit --equal_terms`: the bandit lab's methods on equal terms (docs/coverage-lab.md).

The same regimes, instances, pairs and reward worlds as `hypo lab bandit` (the same seeds), but every method gets
the same tuning budget, five settings: DPO's beta and RLHF's beta in {0.03, 0.1, 0.3, 1, 3}, HyPO's kl_coef (exact
and sampled) in {0.01, 0.03, 0.1, 0.3, 1} at the project's default beta 0.1. Every step-trained setting is read at
its final iterate and also stopped, per instance, at the last logged iterate before its exact reverse KL first
exceeds a budget (label-free: the KL needs no reward). Per KL budget, each method's setting is chosen two ways:
- label-free: among the settings whose mean KL is within the budget (trained ones stopped at it, RLHF by its beta),
  the one that spends most of it (the largest mean KL);
- gold oracle (not label-free, reported beside it): the one with the best worst-world gain within the budget.
Differences between methods are paired by instance (the same pairs), with 95% bootstrap intervals over instances
of the worst-world gain (the lowest per-world mean). Writes `equal_terms.md` and `equal_terms.csv`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypo.lab.bandit.experiments import spec_generator
from hypo.lab.bandit.problem import MethodSpec, policy_logps, reverse_kl, sample_pairs
from hypo.lab.bandit.regimes import REGIMES, Sizes, make_bandit_worlds, split_regime
from hypo.lab.bandit.training import (
    FullBatchOptimizer,
    TrainSettings,
    fit_reward_model,
    method_loss,
    rlhf_optimum,
    world_metrics,
)
from hypo.lab.coverage_controls.analysis import kl_budget_index, reading
from hypo.lab.partial_coverage.analysis import paired_bootstrap

METHODS = ("dpo", "hypo", "hypo_sampled", "rlhf")
COMPARISONS = (("hypo", "dpo"), ("hypo", "rlhf"), ("hypo_sampled", "dpo"), ("rlhf", "dpo"))


@dataclass
class EqualTermsConfig:
    """Options of `hypo lab bandit --equal_terms`."""

    seed: int = 0
    """The bandit lab's seed: the same instances and pairs as `hypo lab bandit --seed`."""
    instances: int = 40
    """Random instances per regime."""
    regimes: tuple[str, ...] = REGIMES
    """Regimes to run."""
    num_pairs: int = 128
    """Offline pairs per instance."""
    betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    """DPO's and RLHF's settings."""
    hypo_beta: float = 0.1
    """HyPO's beta (the project's default), fixed so that HyPO has as many settings as the others."""
    kl_coefs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    """HyPO's settings (exact and sampled)."""
    budgets: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """Reverse-KL budgets (nats)."""
    num_generations: int = 4
    """Samples per context of sampled HyPO."""
    reward_model_weight_decay: float = 1e-3
    """L2 term of RLHF's reward model (the bandit lab's)."""
    replicates: int = 2000
    """Bootstrap replicates of the paired intervals."""
    train: TrainSettings = field(default_factory=TrainSettings)
    sizes: Sizes = field(default_factory=Sizes)

    @classmethod
    def quick(cls, seed: int = 0, instances: int = 4) -> EqualTermsConfig:
        return cls(seed=seed, instances=instances, regimes=("tabular-partial-bt", "linear-trap-det"), num_pairs=32,
                   betas=(0.1, 1.0), kl_coefs=(0.1, 1.0), budgets=(0.5,), replicates=200,
                   train=TrainSettings(steps=40, log_every=10))

    def specs(self) -> dict[str, list[MethodSpec]]:
        """Five settings per method (as many as `betas` / `kl_coefs` hold)."""
        return {"dpo": [MethodSpec("dpo", beta=b) for b in self.betas],
                "hypo": [MethodSpec("hypo", beta=self.hypo_beta, kl_coef=c) for c in self.kl_coefs],
                "hypo_sampled": [MethodSpec("hypo_sampled", beta=self.hypo_beta, kl_coef=c,
                                            num_generations=self.num_generations) for c in self.kl_coefs],
                "rlhf": [MethodSpec("rlhf", beta=b) for b in self.betas]}


def train_with_snapshots(bandit, pairs, spec: MethodSpec, settings: TrainSettings, *,
                         generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The bandit lab's training loop (`hypo.lab.bandit.training.train_policy`: the same loss, optimizer and sampling
    order), keeping theta at step 0 and every `log_every` steps. Returns the snapshots and their exact mean
    reverse KL per instance. Shape: -> [theta (I, d)] * T, kl (T, I)"""
    theta = torch.zeros(bandit.features.shape[0], bandit.features.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = FullBatchOptimizer(theta, lr=settings.learning_rate, kind=settings.optimizer)
    snapshots = [theta.detach().clone()]
    for step in range(1, settings.steps + 1):
        loss = method_loss(theta, bandit, pairs, spec, generator=generator)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        if step % settings.log_every == 0 or step == settings.steps:
            snapshots.append(theta.detach().clone())
    with torch.no_grad():
        kls = torch.stack([reverse_kl(policy_logps(t, bandit), bandit.ref_logps).mean(-1) for t in snapshots])
    return snapshots, kls


def stopped_theta(snapshots: list[torch.Tensor], kls: torch.Tensor, budget: float) -> torch.Tensor:
    """Per instance, the snapshot `kl_budget_index` keeps. Shape: [theta (I, d)] * T, kl (T, I) -> (I, d)"""
    index = [kl_budget_index(kls[:, i].tolist(), budget) for i in range(kls.shape[1])]
    return torch.stack([snapshots[t][i] for i, t in enumerate(index)])


def gains(theta: torch.Tensor, bandit, worlds) -> tuple[torch.Tensor, list[str]]:
    """Gold reward gain per world and instance. Shape: -> (W, I), world names"""
    by_world = world_metrics(theta, bandit, worlds)
    names = list(by_world)
    return torch.stack([by_world[w]["reward_gain"] for w in names]), names


def worst_of(values: torch.Tensor) -> float:
    """The lowest per-world mean. Shape: (W, I) -> float"""
    return values.mean(-1).min().item()


def run_regime(regime: str, config: EqualTermsConfig, seed: int) -> list[dict]:
    """Every setting of every method on one regime, read final and stopped at each budget; then each method's
    label-free and oracle pick per budget, and the paired differences."""
    generator = torch.Generator().manual_seed(seed)
    bandit, worlds = make_bandit_worlds(regime, config.instances, generator, config.sizes)
    pairs = sample_pairs(bandit, config.num_pairs, labels=split_regime(regime)[1], generator=generator)
    reward_weights = fit_reward_model(bandit, pairs, weight_decay=config.reward_model_weight_decay)
    # candidates[budget][method]: list of (label, mean KL, gains (W, I))
    candidates: dict[float, dict[str, list]] = {b: {m: [] for m in METHODS} for b in config.budgets}
    names: list[str] = []
    for method, specs in config.specs().items():
        for spec in specs:
            if method == "rlhf":
                theta = rlhf_optimum(reward_weights, beta=spec.beta)
                with torch.no_grad():
                    kl = reverse_kl(policy_logps(theta, bandit), bandit.ref_logps).mean(-1)
                values, names = gains(theta, bandit, worlds)
                for budget in config.budgets:
                    candidates[budget][method].append((spec.label, kl.mean().item(), values))
                continue
            snapshots, kls = train_with_snapshots(bandit, pairs, spec, config.train,
                                                  generator=spec_generator(seed, spec))
            for budget in config.budgets:
                theta = stopped_theta(snapshots, kls, budget)
                with torch.no_grad():
                    kl = reverse_kl(policy_logps(theta, bandit), bandit.ref_logps).mean(-1)
                values, names = gains(theta, bandit, worlds)
                candidates[budget][method].append((f"{spec.label}, stopped", kl.mean().item(), values))
    rows = []
    for budget in config.budgets:
        picks: dict[str, dict[str, tuple]] = {"label_free": {}, "oracle": {}}
        for method in METHODS:
            within = [c for c in candidates[budget][method] if c[1] <= budget]
            if not within:
                continue
            picks["label_free"][method] = max(within, key=lambda c: c[1])
            picks["oracle"][method] = max(within, key=lambda c: worst_of(c[2]))
        for rule, chosen in picks.items():
            for method, (label, kl, values) in chosen.items():
                rows.append({"regime": regime, "budget": budget, "rule": rule, "row": method, "setting": label,
                             "kl": round(kl, 4), "worst": round(worst_of(values), 4),
                             "worst_world": names[int(values.mean(-1).argmin())], "low": "", "high": "", "reading": ""})
            for a, b in COMPARISONS:
                if a not in chosen or b not in chosen:
                    continue
                diff = paired_bootstrap(chosen[a][2].numpy()[:, :, None], chosen[b][2].numpy()[:, :, None],
                                        replicates=config.replicates, seed=0, worst=True)
                rows.append({"regime": regime, "budget": budget, "rule": rule, "row": f"{a} - {b}", "setting": "",
                             "kl": "", "worst": round(diff["estimate"], 4), "worst_world": "",
                             "low": round(diff["low"], 4), "high": round(diff["high"], 4),
                             "reading": reading(diff["low"], diff["high"], smallest=0.1, ahead=a, behind=b)})
    return rows


def write_equal_terms(rows: list[dict], config: EqualTermsConfig, out: Path) -> None:
    """equal_terms.csv (every row) and equal_terms.md (per regime and budget: the picks and the paired differences)."""
    with open(out / "equal_terms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Coverage lab (bandits) on equal terms", "",
             f"{config.instances} instances per regime (seed {config.seed}: the instances and pairs of `hypo lab "
             "bandit`), five settings per method: DPO and RLHF beta in "
             f"{list(config.betas)}, HyPO (exact and sampled) kl_coef in {list(config.kl_coefs)} at beta "
             f"{config.hypo_beta:g}. Trained settings are stopped, per instance, at the last logged iterate before "
             "their exact reverse KL first exceeds the budget. Label-free pick: among settings with mean KL within the "
             "budget, the largest mean KL. Gold oracle pick (not label-free): the best worst-world gain within the "
             "budget. Cells: worst-world gold reward gain (the lowest per-world mean over instances); differences "
             f"paired by instance, 95% bootstrap over instances ({config.replicates} replicates); reading with a "
             "smallest effect of 0.1.", ""]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        lines += [f"## {regime}", "", "| KL budget | pick | DPO | HyPO | HyPO sampled | RLHF | HyPO - DPO | HyPO - RLHF | "
                  "HyPO sampled - DPO | RLHF - DPO |", "|---|---|---|---|---|---|---|---|---|---|"]
        for budget in config.budgets:
            for rule in ("label_free", "oracle"):
                mine = [r for r in rows if r["regime"] == regime and r["budget"] == budget and r["rule"] == rule]
                cells = []
                for method in METHODS:
                    r = next((r for r in mine if r["row"] == method), None)
                    cells.append("-" if r is None else f"{r['worst']:+.2f} ({r['setting']}; KL {r['kl']:.2f})")
                for a, b in COMPARISONS:
                    r = next((r for r in mine if r["row"] == f"{a} - {b}"), None)
                    cells.append("-" if r is None else f"{r['worst']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]")
                lines.append(f"| {budget:g} | {rule.replace('_', '-')} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "equal_terms.md").write_text("\n".join(lines))


def run_equal_terms(config: EqualTermsConfig, output_dir: Path) -> list[dict]:
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for regime in config.regimes:  # the bandit lab's regime seeds
        rows += run_regime(regime, config, seed=config.seed * 1000 + REGIMES.index(regime))
    write_equal_terms(rows, config, output_dir)
    return rows
