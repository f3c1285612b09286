"""`hypo lab bandit`: sweeps over methods and hyperparameters on every regime, tables and plots.

Each regime draws I random instances and one offline dataset per instance; every method trains on
the same pairs from the reference (theta = 0); RLHF is the exact optimum of the KL-regularized
objective for the fitted reward model. Every trained policy is then scored in each reward world of its
regime (`hypo.lab.bandit.regimes`: gold rewards that agree on the covered responses, so the pairs cannot tell
them apart). Results: results.csv and summary.md (the regime's own world), worlds.csv and worlds.md
(every world, the worst world and the mean over worlds), curves_*.png, frontier.png and
frontier_worlds.png.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hypo.lab.bandit.problem import MethodSpec, sample_pairs
from hypo.lab.bandit.regimes import REGIMES, Sizes, as_built_world, make_bandit_worlds, split_regime
from hypo.lab.bandit.training import METRICS, TrainSettings, fit_reward_model, train_policy, world_metrics

Z95 = 1.959964
"""Two-sided 95% normal quantile: intervals across instances are mean +- Z95 * sd / sqrt(I)."""


@dataclass
class LabConfig:
    """Options of `hypo lab bandit` (saved as config.json beside the results)."""

    seed: int = 0
    instances: int = 40
    regimes: tuple[str, ...] = REGIMES
    num_pairs: int = 128
    betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    """beta values of DPO and HyPO."""
    rlhf_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0)
    """beta (KL weight) values of RLHF; its optimum is closed form, so a dense sweep costs nothing."""
    kl_coefs: tuple[float, ...] = (0.01, 0.1, 1.0)
    """kl_coef values of HyPO, the same for the exact and the sampled online term."""
    num_generations: int = 4
    reward_model_weight_decay: float = 1e-3
    """L2 term of the Bradley-Terry reward model (keeps it finite on separable data)."""
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
        specs += [MethodSpec("hypo_sampled", beta=b, kl_coef=c, num_generations=self.num_generations)
                  for b in self.betas for c in self.kl_coefs]
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


def interval(values: torch.Tensor) -> tuple[float, float]:
    """95% interval of the mean across instances (normal approximation): mean -+ Z95 * sd / sqrt(I)."""
    half = Z95 * values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")
    return values.mean().item() - half, values.mean().item() + half


def across_worlds(per_world: dict[str, torch.Tensor]) -> dict[str, float | str]:
    """Aggregate one metric over the reward worlds of a regime (higher is better).

    per_world {world: (I,)} -> worst (the lowest of the per-world means across instances), worst_world
    (its name), mean (the mean of the per-world means), instance_worst (the mean across instances of each
    instance's lowest value over the worlds; <= worst), worst_low / worst_high (the 95% interval across
    instances of the worst world's mean).
    """
    names = list(per_world)
    values = torch.stack([per_world[name] for name in names])  # (W, I)
    means = values.mean(-1)  # (W,)
    worst = int(means.argmin())
    low, high = interval(values[worst])
    return {"worst": means[worst].item(), "worst_world": names[worst], "mean": means.mean().item(),
            "instance_worst": values.min(0).values.mean().item(), "worst_low": low, "worst_high": high}


def spec_generator(seed: int, spec: MethodSpec) -> torch.Generator:
    """The sampling generator of one run: depends on the regime seed and the setting only, so a run's
    numbers do not change when other settings are added to the sweep."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{spec.label}".encode()))


def spec_columns(regime: str, spec: MethodSpec, instances: int) -> dict:
    return {"regime": regime, "method": spec.method, "beta": spec.beta if spec.method != "reference" else "",
            "kl_coef": spec.kl_coef if spec.method.startswith("hypo") else "", "instances": instances}


def run_regime(regime: str, config: LabConfig, seed: int) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Every method on one regime. Returns table rows (the regime's own world, plus the aggregates over
    its worlds), mean curves {label: {metric: (T,) list}} and one row per (world, setting)."""
    generator = torch.Generator().manual_seed(seed)
    bandit, worlds = make_bandit_worlds(regime, config.instances, generator, config.sizes)
    pairs = sample_pairs(bandit, config.num_pairs, labels=split_regime(regime)[1], generator=generator)
    reward_weights = fit_reward_model(bandit, pairs, weight_decay=config.reward_model_weight_decay)
    rows, curves, world_rows = [], {}, []
    for spec in config.specs():
        theta, history = train_policy(bandit, pairs, spec, config.train, reward_weights=reward_weights,
                                      generator=spec_generator(seed, spec))
        row = spec_columns(regime, spec, config.instances)
        for name, values in summarize(history).items():
            for stat, value in stats(values).items():
                row[f"{name}/{stat}"] = round(value, 4)
        by_world = world_metrics(theta, bandit, worlds)
        for metric in ("reward_gain", "win_rate"):
            for key, value in across_worlds({w: m[metric] for w, m in by_world.items()}).items():
                row[f"worlds/{metric}/{key}"] = value if isinstance(value, str) else round(value, 4)
        rows.append(row)
        for world, metrics in by_world.items():
            world_row = {**spec_columns(regime, spec, config.instances), "world": world,
                         "as_built": world == as_built_world(regime),
                         "objective/kl/mean": row["objective/kl/mean"]}
            for metric, values in metrics.items():
                low, high = interval(values)
                world_row.update({f"{metric}/mean": round(values.mean().item(), 4),
                                  f"{metric}/p10": round(stats(values)["p10"], 4),
                                  f"{metric}/ci_low": round(low, 4), f"{metric}/ci_high": round(high, 4)})
            world_rows.append(world_row)
        curves[spec.label] = {name: history[name].mean(-1).tolist() for name in ("step", *METRICS)}
    return rows, curves, world_rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: list[dict], curves: dict[str, dict], out: Path) -> None:
    """results.csv (every column) and summary.md (one table per regime, the main columns)."""
    write_csv(rows, out / "results.csv")
    head = ("| method | beta | kl_coef | KL mean (p90) | reward gain mean / median / p10 | win rate mean (p10) "
            "| off-support mass mean (p90) | best unseen prob | d logp chosen / rejected |")
    lines = ["# Coverage lab: exact bandit results", "",
             f"Final values after training, across {rows[0]['instances']} instances per regime: mean, median, "
             "and the worst decile (p90 of KL and off-support mass, p10 of reward gain and win rate). "
             "Reward gain is E_pi r - E_ref r under the regime's own gold reward; the other reward worlds "
             "the same pairs allow are in worlds.md. RLHF is the exact optimum of its objective.", ""]
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


def write_worlds(rows: list[dict], world_rows: list[dict], out: Path,
                 budgets: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)) -> None:
    """worlds.csv (one row per regime, world and setting) and worlds.md: per regime, the mean gold reward
    gain of every setting in each world, the worst world and the mean over worlds, then the best
    worst-world and mean-over-worlds gain at matched KL."""
    write_csv(world_rows, out / "worlds.csv")
    lines = ["# Coverage lab: every reward world the data allow", "",
             "Every policy of summary.md scored under each gold reward that agrees with the regime's own on "
             "every covered response (same pairs; definitions in docs/coverage-lab.md). Cells: mean gold "
             f"reward gain across {rows[0]['instances']} instances; * marks the regime's own world. "
             "worst: the lowest per-world mean, with its 95% interval across instances; mean: the mean over "
             "worlds; inst. worst: the mean across instances of each instance's worst world. Win rate: worst "
             "/ mean over worlds. KL does not depend on the world.", ""]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        mine = [r for r in world_rows if r["regime"] == regime]
        worlds = list(dict.fromkeys(r["world"] for r in mine))
        built = next(r["world"] for r in mine if r["as_built"])
        names = [f"{w}*" if w == built else w for w in worlds]
        lines += [f"## {regime}", "",
                  "| method | beta | kl_coef | KL | " + " | ".join(names)
                  + " | worst [95% CI] | mean | inst. worst | win rate worst / mean |",
                  "|" + "---|" * (len(worlds) + 8)]
        for r in (r for r in rows if r["regime"] == regime):
            gains = {w["world"]: w["reward_gain/mean"] for w in mine
                     if (w["method"], w["beta"], w["kl_coef"]) == (r["method"], r["beta"], r["kl_coef"])}
            lines.append(
                f"| {r['method']} | {r['beta']} | {r['kl_coef']} | {r['objective/kl/mean']:.2f} | "
                + " | ".join(f"{gains[w]:+.2f}" for w in worlds)
                + f" | {r['worlds/reward_gain/worst']:+.2f} [{r['worlds/reward_gain/worst_low']:+.2f}, "
                f"{r['worlds/reward_gain/worst_high']:+.2f}] | {r['worlds/reward_gain/mean']:+.2f} "
                f"| {r['worlds/reward_gain/instance_worst']:+.2f} "
                f"| {r['worlds/win_rate/worst']:.2f} / {r['worlds/win_rate/mean']:.2f} |")
        lines.append("")
    for key, title in (("worst", "worst world"), ("mean", "mean over worlds")):
        lines += [f"## Matched KL, {title}", "",
                  f"Best {title} gold reward gain over each method's sweep with mean KL <= budget ('-': none).",
                  "", "| regime | method | " + " | ".join(f"KL <= {b:g}" for b in budgets) + " | any KL |",
                  "|" + "---|" * (len(budgets) + 3)]
        for regime in dict.fromkeys(r["regime"] for r in rows):
            for method in ("dpo", "hypo", "hypo_sampled", "rlhf"):
                points = [(r["objective/kl/mean"], r[f"worlds/reward_gain/{key}"]) for r in rows
                          if r["regime"] == regime and r["method"] == method]
                lines.append(f"| {regime} | {method} | " + " | ".join(best_within(points, budgets)) + " |")
        lines.append("")
    (out / "worlds.md").write_text("\n".join(lines))


def best_within(points: list[tuple[float, float]], budgets: tuple[float, ...]) -> list[str]:
    """For each KL budget (and no budget), the best gain among (kl, gain) points within it ('-': none)."""
    cells = []
    for budget in (*budgets, float("inf")):
        gains = [gain for kl, gain in points if kl <= budget]
        cells.append(f"{max(gains):+.2f}" if gains else "-")
    return cells


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
            points = [(r["objective/kl/mean"], r["reward_gain/mean"]) for r in rows
                      if r["regime"] == regime and r["method"] == method]
            lines.append(f"| {regime} | {method} | " + " | ".join(best_within(points, budgets)) + " |")
        steps = [(kl, gain) for label, c in curves[regime].items() if label.startswith("dpo ")
                 for kl, gain in zip(c["objective/kl"], c["reward_gain"], strict=True)]
        lines.append(f"| {regime} | dpo, oracle early stop | " + " | ".join(best_within(steps, budgets)) + " |")
    return lines + [""]


def headline_labels(config: LabConfig) -> list[str]:
    """The configurations drawn in the curve plots: every method at beta = 0.1 (or the first beta),
    HyPO at kl_coef = 0.1 (or the first kl_coef)."""
    beta = 0.1 if 0.1 in config.betas else config.betas[0]
    coef = 0.1 if 0.1 in config.kl_coefs else config.kl_coefs[0]
    specs = [MethodSpec("reference"), MethodSpec("dpo", beta=beta), MethodSpec("hypo", beta=beta, kl_coef=coef),
             MethodSpec("hypo_sampled", beta=beta, kl_coef=coef), MethodSpec("rlhf", beta=beta)]
    return [s.label for s in specs]


def _grid(n: int):
    from hypo.evaluation.report import pyplot

    plt = pyplot()

    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_curves(curves: dict[str, dict], labels: list[str], metric: str, path: Path) -> None:
    """One panel per regime: the mean of `metric` over training for each headline configuration
    (RLHF, which is not trained by steps, as a dashed line at its optimum)."""
    plt, fig, axes = _grid(len(curves))
    for ax, (regime, by_label) in zip(axes, curves.items(), strict=True):
        for label in labels:
            curve = by_label[label]
            if label.startswith("rlhf"):
                ax.axhline(curve[metric][-1], linestyle="--", color="gray", label=f"{label} (optimum)")
            else:
                ax.plot(curve["step"], curve[metric], label=label)
        ax.set_title(regime, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_frontier(rows: list[dict], path: Path, *, key: str = "reward_gain/mean",
                  ylabel: str = "gold reward gain") -> None:
    """One panel per regime: reward gain (`key`) against mean reverse KL across the beta (x kl_coef) sweep."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    plt, fig, axes = _grid(len(regimes))
    for ax, regime in zip(axes, regimes, strict=True):
        mine = [r for r in rows if r["regime"] == regime and r["method"] != "reference"]
        groups = dict.fromkeys((r["method"], r["kl_coef"]) for r in mine)
        for method, coef in groups:
            pts = sorted((r["objective/kl/mean"], r[key]) for r in mine
                         if r["method"] == method and r["kl_coef"] == coef)
            style = "o--" if method == "hypo_sampled" else "o-"
            name = method if coef == "" else f"{method} kl_coef={coef:g}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=name)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(regime, fontsize=9)
        ax.set_xlabel("reverse KL to reference")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_bandit_lab(config: LabConfig, output_dir: Path) -> list[dict]:
    """Run every regime, write results.csv, summary.md, worlds.csv, worlds.md, config.json and the
    plots; return the rows."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, curves, world_rows = [], {}, []
    for regime in config.regimes:  # the seed of a regime does not depend on which others run
        regime_rows, curves[regime], regime_worlds = run_regime(regime, config,
                                                                seed=config.seed * 1000 + REGIMES.index(regime))
        rows += regime_rows
        world_rows += regime_worlds
    write_table(rows, curves, output_dir)
    write_worlds(rows, world_rows, output_dir)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    labels = headline_labels(config)
    for metric, name in (("objective/kl", "kl"), ("off_support_mass", "off_support"), ("reward_gain", "reward"),
                         ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
        plot_curves(curves, labels, metric, output_dir / f"curves_{name}.png")
    plot_frontier(rows, output_dir / "frontier.png")
    plot_frontier(rows, output_dir / "frontier_worlds.png", key="worlds/reward_gain/worst",
                  ylabel="gold reward gain, worst world")
    return rows
