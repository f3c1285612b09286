"""Tables of `hypo lab partial-coverage` from its per-run JSON files (`<output_dir>/runs/*.json`) and the
reference's evaluation (`reference.json`): per-checkpoint means, DPO - HyPO paired by seed with bootstrap
intervals over seeds and prompts, at equal steps and at matched reverse KL, per gold world and in the worst
world, and the smallest difference the design resolves. Writes `summary.md` and `summary.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hypo.lab.partial_coverage.analysis import (
    interpolate_at_kl,
    minimum_detectable_difference,
    paired_bootstrap,
)

WORLDS = ("penalize", "ignore", "reward")
KL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def load_results(out: Path) -> tuple[dict[str, Any] | None, dict[str, list[dict]]]:
    """The reference's evaluation and the run results grouped by setting ('dpo', 'hypo-kl0.1', ...), each list
    sorted by seed."""
    ref_path = out / "reference.json"
    reference = json.loads(ref_path.read_text()) if ref_path.is_file() else None
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []:
        result = json.loads(path.read_text())
        run = result["run"]
        groups["dpo" if run["method"] == "dpo" else f"hypo-kl{run['kl_coef']:g}"].append(result)
    return reference, {k: sorted(v, key=lambda r: r["run"]["seed"]) for k, v in groups.items()}


def trajectory(reference: dict, result: dict) -> list[dict]:
    """The run's evaluations in step order, the reference first (step 0)."""
    return [reference, *sorted(result["checkpoints"], key=lambda c: c["step"])]


def per_prompt(evaluation: dict, world: str, key: str = "win") -> np.ndarray:
    return np.asarray(evaluation["per_prompt"][world][key], dtype=float)


def _by_world(evaluations: list[dict], key: str = "win") -> np.ndarray:
    """(W, S, P) of per-prompt values, one evaluation per seed."""
    return np.stack([np.stack([per_prompt(e, w, key) for e in evaluations]) for w in WORLDS])


def compare(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """a - b (W, S, P), per world and worst case, bootstrap over seeds and prompts."""
    out = {w: paired_bootstrap(a[i], b[i], seed=seed) for i, w in enumerate(WORLDS)}
    out["worst"] = paired_bootstrap(a, b, seed=seed, worst=True)
    return out


def _common_seeds(groups: dict[str, list[dict]], name: str) -> tuple[list[dict], list[dict]]:
    seeds = {r["run"]["seed"] for r in groups[name]} & {r["run"]["seed"] for r in groups.get("dpo", [])}
    pick = lambda rs: [r for r in rs if r["run"]["seed"] in seeds]  # noqa: E731
    return pick(groups["dpo"]), pick(groups[name])


def matched_kl(reference: dict, dpo: list[dict], hypo: list[dict], key: str = "win") -> list[dict[str, Any]]:
    """DPO - HyPO at common reverse-KL levels: each run's per-prompt values interpolated where its KL trajectory
    first reaches the level (the KL weights from the run's mean KL; not resampled). Levels: fractions of the
    largest KL every run of both methods reaches."""
    runs = [*dpo, *hypo]
    reach = min(max(c["kl"][0] for c in trajectory(reference, r)) for r in runs)
    rows = []
    for fraction in KL_FRACTIONS:
        level = fraction * reach
        values = []
        for group in (dpo, hypo):
            per_run = []
            for r in group:
                traj = trajectory(reference, r)
                kls = [c["kl"][0] for c in traj]
                stacked = np.stack([np.stack([per_prompt(c, w, key) for w in WORLDS]) for c in traj])  # (T, W, P)
                per_run.append(interpolate_at_kl(kls, stacked, level))
            values.append(np.stack(per_run, axis=1))  # (W, S, P)
        steps = {name: [round(_step_at(reference, r, level), 1) for r in group]
                 for name, group in (("dpo", dpo), ("hypo", hypo))}
        rows.append({"kl": level, "fraction": fraction, "dpo_mean": values[0].mean(axis=(1, 2)).tolist(),
                     "hypo_mean": values[1].mean(axis=(1, 2)).tolist(), "steps": steps,
                     "diff": compare(values[0], values[1])})
    return rows


def _step_at(reference: dict, result: dict, level: float) -> float:
    traj = trajectory(reference, result)
    return float(interpolate_at_kl([c["kl"][0] for c in traj], np.array([c["step"] for c in traj]), level))


def checkpoint_table(reference: dict, group: list[dict]) -> list[dict[str, Any]]:
    """Mean (and sd across seeds) of each checkpoint's metrics over the group's runs."""
    steps = sorted({c["step"] for r in group for c in r["checkpoints"]})
    rows = []
    for step in [0, *steps]:
        evals = [reference] * len(group) if step == 0 else \
            [next(c for c in r["checkpoints"] if c["step"] == step) for r in group]

        def stat(fn, evals=evals):
            values = np.array([fn(e) for e in evals], dtype=float)
            return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")

        row = {"step": step, "epoch": evals[0]["epoch"], "kl": stat(lambda e: e["kl"][0]),
               "kl_se": float(np.mean([e["kl"][1] for e in evals])), "kl_k3": stat(lambda e: e["kl_k3"][0]),
               "off_range": stat(lambda e: e["off_range"][0]), "eos_rate": stat(lambda e: e["eos_rate"]),
               "long_rate": stat(lambda e: e["long_rate"]), "short_rate": stat(lambda e: e["short_rate"]),
               "mean_length": stat(lambda e: e["mean_length_words"]),
               "positive_rate": stat(lambda e: e["positive_rate"])}
        for w in WORLDS:
            row[f"win_{w}"] = stat(lambda e, w=w: e["worlds"][w]["win_rate"][0])
            row[f"score_{w}"] = stat(lambda e, w=w: e["worlds"][w]["score"][0])
        row["win_worst"] = stat(lambda e: min(e["worlds"][w]["win_rate"][0] for w in WORLDS))
        for split in ("train", "heldout"):
            for side in ("chosen", "rejected"):
                row[f"drift_{split}_{side}"] = stat(lambda e, s=split, d=side: e["drift"][s][d]) \
                    if step else (0.0, 0.0)
        rows.append(row)
    return rows


def analyse(out: Path) -> dict[str, Any]:
    reference, groups = load_results(out)
    summary: dict[str, Any] = {"settings": {k: [r["run"]["seed"] for r in v] for k, v in groups.items()},
                               "checkpoints": {}, "equal_steps": {}, "matched_kl": {}, "power": {}}
    if reference is None or not groups:
        return summary
    for name, group in groups.items():
        summary["checkpoints"][name] = checkpoint_table(reference, group)
    for name in sorted(k for k in groups if k != "dpo"):
        if "dpo" not in groups:
            break
        dpo, hypo = _common_seeds(groups, name)
        if len(dpo) < 2:
            continue
        steps = sorted({c["step"] for r in dpo for c in r["checkpoints"]})
        per_step = {}
        for step in steps:
            pick = lambda g, s=step: [next(c for c in r["checkpoints"] if c["step"] == s) for r in g]  # noqa: E731
            per_step[step] = compare(_by_world(pick(dpo)), _by_world(pick(hypo)))
        summary["equal_steps"][name] = per_step
        final = per_step[steps[-1]]
        summary["power"][name] = {w: {"se": final[w]["se"], "mdd": minimum_detectable_difference(final[w]["se"])}
                                  for w in (*WORLDS, "worst")}
        summary["matched_kl"][name] = matched_kl(reference, dpo, hypo)
    return summary


# --- markdown ----------------------------------------------------------------------------------------------


def _f(pair, digits: int = 3) -> str:
    mean, sd = pair
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _ci(d: dict, digits: int = 3) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def markdown(summary: dict[str, Any], reference: dict | None, gate: dict | None) -> str:
    lines = ["# Partial-coverage lab: results", ""]
    if gate:
        lines += [f"Gate (first seed's DPO run {gate['run']}): off-range rate rose {gate['rise']:+.3f} above the "
                  f"reference's (threshold {gate['threshold']:+.2f}): {'passed' if gate['passed'] else 'FAILED'}.", ""]
    lines += ["Settings and seeds: " + "; ".join(f"{k}: {v}" for k, v in summary["settings"].items()), ""]
    if reference:
        lines += [f"Reference (step 0): off-range {reference['off_range'][0]:.3f}, EOS rate {reference['eos_rate']:.3f}, "
                  f"mean length {reference['mean_length_words']:.2f} words, gold score "
                  + ", ".join(f"{w} {reference['worlds'][w]['score'][0]:.3f}" for w in WORLDS), ""]
    lines += ["## Over training (mean ± sd across seeds)", ""]
    for name, rows in summary["checkpoints"].items():
        lines += [f"### {name}", "",
                  "| step | epoch | KL k1 (mean se) | KL k3 | off-range | long | short | EOS | length | pos. rate | "
                  "win penalize | win ignore | win reward | worst | drift train ch/rej | drift held-out ch/rej |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['step']} | {r['epoch']:.1f} | {_f(r['kl'], 2)} ({r['kl_se']:.2f}) | {_f(r['kl_k3'], 2)} | "
                f"{_f(r['off_range'])} | {r['long_rate'][0]:.3f} | {r['short_rate'][0]:.3f} | {r['eos_rate'][0]:.3f} | "
                f"{r['mean_length'][0]:.1f} | {r['positive_rate'][0]:.3f} | {_f(r['win_penalize'])} | "
                f"{_f(r['win_ignore'])} | {_f(r['win_reward'])} | {_f(r['win_worst'])} | "
                f"{r['drift_train_chosen'][0]:+.1f} / {r['drift_train_rejected'][0]:+.1f} | "
                f"{r['drift_heldout_chosen'][0]:+.1f} / {r['drift_heldout_rejected'][0]:+.1f} |")
        lines.append("")
    for name, per_step in summary["equal_steps"].items():
        lines += [f"## DPO - {name}: win rate at equal steps (paired by seed; 95% bootstrap over seeds and prompts)",
                  "", "| step | penalize | ignore | reward | worst world |", "|---|---|---|---|---|"]
        for step, d in per_step.items():
            lines.append(f"| {step} | " + " | ".join(_ci(d[w]) for w in (*WORLDS, "worst")) + " |")
        power = summary["power"][name]
        lines += ["", "Power (final step): bootstrap se of the difference and the smallest true difference detected "
                  "with 80% power at 5%: " + ", ".join(f"{w} se {p['se']:.3f} -> {p['mdd']:.3f}"
                                                         for w, p in power.items()), ""]
        lines += [f"## DPO - {name}: win rate at matched reverse KL", "",
                  "| KL (nats) | DPO step / HyPO step (mean) | penalize | ignore | reward | worst world | "
                  "DPO win p/i/r | HyPO win p/i/r |", "|---|---|---|---|---|---|---|---|"]
        for row in summary["matched_kl"][name]:
            d = row["diff"]
            lines.append(f"| {row['kl']:.2f} | {np.mean(row['steps']['dpo']):.0f} / {np.mean(row['steps']['hypo']):.0f} | "
                         + " | ".join(_ci(d[w]) for w in (*WORLDS, "worst")) + " | "
                         + "/".join(f"{v:.3f}" for v in row["dpo_mean"]) + " | "
                         + "/".join(f"{v:.3f}" for v in row["hypo_mean"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value


COLORS = {"dpo": "tab:blue", "hypo-kl0.01": "tab:orange", "hypo-kl0.05": "tab:green"}


def plot(out: Path, reference: dict, groups: dict[str, list[dict]]) -> None:
    """`curves.png`: per setting, each seed's off-range rate and worst-world win rate over training, and the
    worst-world win rate against the reverse KL (log scale) with the reference at KL 0 left out."""
    from hypo.evaluation.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, group in groups.items():
        color = COLORS.get(name)
        for i, result in enumerate(group):
            traj = trajectory(reference, result)
            steps = [c["step"] for c in traj]
            worst = [min(c["worlds"][w]["win_rate"][0] for w in WORLDS) for c in traj]
            label = name if i == 0 else None
            axes[0].plot(steps, [c["off_range"][0] for c in traj], color=color, alpha=0.5, label=label)
            axes[1].plot(steps, worst, color=color, alpha=0.5, label=label)
            axes[2].plot([c["kl"][0] for c in traj[1:]], worst[1:], color=color, alpha=0.5, marker=".", label=label)
    axes[0].set(xlabel="optimizer step", ylabel="off-range rate (L outside [8, 12] or no EOS)")
    axes[1].set(xlabel="optimizer step", ylabel="worst-world win rate vs reference")
    axes[2].set(xlabel="reverse KL to reference (k1, nats, log scale)", ylabel="worst-world win rate", xscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Partial-coverage lab: one line per seed (held-out prompts, 4 samples each)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, plots: bool = True) -> dict[str, Any]:
    summary = analyse(out)
    reference, groups = load_results(out)
    if plots and reference is not None and groups:
        plot(out, reference, groups)
    gate = json.loads((out / "gate.json").read_text()) if (out / "gate.json").is_file() else None
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary, reference, gate))
    return summary
