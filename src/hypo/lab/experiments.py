"""`hypo lab bandit`: sweeps over methods and hyperparameters on every regime, a table and plots.

Each regime draws I random instances and one offline dataset per instance; every method trains on
the same pairs from the reference (theta = 0). Results: results.csv (every configuration; mean,
median and deciles across instances), summary.md, curves_*.png and frontier.png.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hypo.lab.bandit import MethodSpec, sample_pairs
from hypo.lab.regimes import REGIMES, Sizes, make_bandit, split_regime
from hypo.lab.training import METRICS, TrainSettings, fit_reward_model, train_policy


@dataclass
class LabConfig:
    """Options of `hypo lab bandit` (saved as config.json beside the results)."""

    seed: int = 0
    instances: int = 40
    regimes: tuple[str, ...] = REGIMES
    num_pairs: int = 128
    betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    rlhf_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    kl_coefs: tuple[float, ...] = (0.01, 0.1, 1.0)
    sampled_kl_coef: float = 0.1
    """HyPO with the sampled estimator runs at this kl_coef for every beta (to compare with exact)."""
    num_generations: int = 4
    train: TrainSettings = field(default_factory=TrainSettings)
    sizes: Sizes = field(default_factory=Sizes)

    @classmethod
    def quick(cls, seed: int = 0, instances: int = 4) -> LabConfig:
        return cls(seed=seed, instances=instances, regimes=("tabular-partial-bt", "linear-trap-det"),
                   num_pairs=32, betas=(0.1, 1.0), rlhf_betas=(0.1, 1.0), kl_coefs=(0.1,),
                   train=TrainSettings(steps=40, log_every=10))

    def specs(self) -> list[MethodSpec]:
        specs = [MethodSpec("reference")]
        specs += [MethodSpec("dpo", beta=b) for b in self.betas]
        specs += [MethodSpec("hypo", beta=b, kl_coef=c) for b in self.betas for c in self.kl_coefs]
        specs += [MethodSpec("hypo_sampled", beta=b, kl_coef=self.sampled_kl_coef,
                             num_generations=self.num_generations) for b in self.betas]
        specs += [MethodSpec("rlhf", beta=b) for b in self.rlhf_betas]
        return specs


def summarize(history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Final values per instance of the reported columns. Shape: history of (T, I) -> dict of (I,)"""
    final = {name: history[name][-1] for name in METRICS}
    final["logps/chosen_change"] = history["logps/chosen"][-1] - history["logps/chosen"][0]
    final["logps/rejected_change"] = history["logps/rejected"][-1] - history["logps/rejected"][0]
    final["objective/kl_max"] = history["objective/kl"].max(0).values
    return final


def stats(values: torch.Tensor) -> dict[str, float]:
    """mean, median, 10th and 90th percentile across instances (the worst decile is p90 for KL and
    off-support mass, p10 for reward gain and win rate)."""
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype))
    return {"mean": values.mean().item(), "median": q[1].item(), "p10": q[0].item(), "p90": q[2].item()}


def run_regime(regime: str, config: LabConfig, seed: int) -> tuple[list[dict], dict[str, dict]]:
    """Every method on one regime. Returns table rows and mean curves {label: {metric: (T,) list}}."""
    generator = torch.Generator().manual_seed(seed)
    bandit = make_bandit(regime, config.instances, generator, config.sizes)
    pairs = sample_pairs(bandit, config.num_pairs, labels=split_regime(regime)[1], generator=generator)
    reward_hat = fit_reward_model(bandit, pairs)
    rows, curves = [], {}
    for spec in config.specs():
        _, history = train_policy(bandit, pairs, spec, config.train, reward_hat=reward_hat, generator=generator)
        row = {"regime": regime, "method": spec.method, "beta": spec.beta if spec.method != "reference" else "",
               "kl_coef": spec.kl_coef if spec.method.startswith("hypo") else "", "instances": config.instances}
        for name, values in summarize(history).items():
            for stat, value in stats(values).items():
                row[f"{name}/{stat}"] = round(value, 4)
        rows.append(row)
        curves[spec.label] = {name: history[name].mean(-1).tolist() for name in ("step", *METRICS)}
    return rows, curves


def write_table(rows: list[dict], curves: dict[str, dict], out: Path) -> None:
    """results.csv (every column) and summary.md (one table per regime, the main columns)."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ("| method | beta | kl_coef | KL mean (p90) | reward gain mean / median / p10 | win rate mean (p10) "
            "| off-support mass mean (p90) | best unseen prob | d logp chosen / rejected |")
    lines = ["# Coverage lab: exact bandit results", "",
             f"Final values after training, across {rows[0]['instances']} instances per regime: mean, median, "
             "and the worst decile (p90 of KL and off-support mass, p10 of reward gain and win rate). "
             "Reward gain is E_pi r - E_ref r under the gold reward.", ""]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        lines += [f"## {regime}", "", head, "|" + "---|" * 9]
        for r in (r for r in rows if r["regime"] == regime):
            lines.append(
                f"| {r['method']} | {r['beta']} | {r['kl_coef']} "
                f"| {r['objective/kl/mean']:.2f} ({r['objective/kl/p90']:.2f}) "
                f"| {r['reward_gain/mean']:+.2f} / {r['reward_gain/median']:+.2f} / {r['reward_gain/p10']:+.2f} "
                f"| {r['win_rate/mean']:.2f} ({r['win_rate/p10']:.2f}) "
                f"| {r['off_support_mass/mean']:.2f} ({r['off_support_mass/p90']:.2f}) "
                f"| {r['best_unseen_prob/mean']:.2f} "
                f"| {r['logps/chosen_change/mean']:+.1f} / {r['logps/rejected_change/mean']:+.1f} |")
        lines.append("")
    lines += frontier_table(rows, curves)
    (out / "summary.md").write_text("\n".join(lines))


def frontier_table(rows: list[dict], curves: dict[str, dict],
                   budgets: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)) -> list[str]:
    """Markdown: per regime and method, the best mean reward gain among configurations whose mean
    reverse KL is within each budget (a reading of the reward-KL frontier at matched KL). The row
    'dpo, oracle early stop' also admits every logged step of every DPO run (chosen with the gold reward,
    so an upper bound on what early stopping can do)."""
    lines = ["## Reward-KL frontier at matched KL", "",
             "Best mean gold reward gain over each method's sweep with mean KL <= budget ('-': none). "
             "'dpo, oracle early stop' also admits every logged step of the DPO runs.", "",
             "| regime | method | " + " | ".join(f"KL <= {b:g}" for b in budgets) + " | any KL |",
             "|" + "---|" * (len(budgets) + 3)]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        for method in ("dpo", "hypo", "hypo_sampled", "rlhf"):
            mine = [r for r in rows if r["regime"] == regime and r["method"] == method]
            cells = []
            for budget in (*budgets, float("inf")):
                gains = [r["reward_gain/mean"] for r in mine if r["objective/kl/mean"] <= budget]
                cells.append(f"{max(gains):+.2f}" if gains else "-")
            lines.append(f"| {regime} | {method} | " + " | ".join(cells) + " |")
        steps = [(kl, gain) for label, c in curves[regime].items() if label.startswith("dpo ")
                 for kl, gain in zip(c["objective/kl"], c["reward_gain"], strict=True)]
        cells = []
        for budget in (*budgets, float("inf")):
            gains = [gain for kl, gain in steps if kl <= budget]
            cells.append(f"{max(gains):+.2f}" if gains else "-")
        lines.append(f"| {regime} | dpo, oracle early stop | " + " | ".join(cells) + " |")
    return lines + [""]


def headline_labels(config: LabConfig) -> list[str]:
    """The configurations drawn in the curve plots: every method at beta = 0.1 (or the first beta)."""
    beta = 0.1 if 0.1 in config.betas else config.betas[0]
    coef = config.sampled_kl_coef
    specs = [MethodSpec("reference"), MethodSpec("dpo", beta=beta), MethodSpec("hypo", beta=beta, kl_coef=coef),
             MethodSpec("hypo_sampled", beta=beta, kl_coef=coef), MethodSpec("rlhf", beta=beta)]
    return [s.label for s in specs]


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_curves(curves: dict[str, dict], labels: list[str], metric: str, path: Path) -> None:
    """One panel per regime: the mean of `metric` over training for each headline configuration."""
    plt, fig, axes = _grid(len(curves))
    for ax, (regime, by_label) in zip(axes, curves.items(), strict=True):
        for label in labels:
            ax.plot(by_label[label]["step"], by_label[label][metric], label=label)
        ax.set_title(regime, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_frontier(rows: list[dict], path: Path) -> None:
    """One panel per regime: mean reward gain against mean reverse KL across the beta (x kl_coef) sweep."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    plt, fig, axes = _grid(len(regimes))
    for ax, regime in zip(axes, regimes, strict=True):
        mine = [r for r in rows if r["regime"] == regime and r["method"] != "reference"]
        groups = dict.fromkeys((r["method"], r["kl_coef"]) for r in mine)
        for method, coef in groups:
            pts = sorted((r["objective/kl/mean"], r["reward_gain/mean"]) for r in mine
                         if r["method"] == method and r["kl_coef"] == coef)
            style = "o--" if method == "hypo_sampled" else "o-"
            name = method if coef == "" else f"{method} kl_coef={coef:g}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=name)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(regime, fontsize=9)
        ax.set_xlabel("reverse KL to reference")
        ax.set_ylabel("gold reward gain")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_bandit_lab(config: LabConfig, output_dir: Path) -> list[dict]:
    """Run every regime, write results.csv, summary.md, config.json and the plots; return the rows."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for regime in config.regimes:  # the seed of a regime does not depend on which others run
        regime_rows, curves[regime] = run_regime(regime, config, seed=config.seed * 1000 + REGIMES.index(regime))
        rows += regime_rows
    write_table(rows, curves, output_dir)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    labels = headline_labels(config)
    for metric, name in (("objective/kl", "kl"), ("off_support_mass", "off_support"), ("reward_gain", "reward"),
                         ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
        plot_curves(curves, labels, metric, output_dir / f"curves_{name}.png")
    plot_frontier(rows, output_dir / "frontier.png")
    return rows
