"""Coverage lab, part 2: DPO, HyPO and online RLHF on a small language model, judged by a gold judge.

`hypo lab lm` runs a grid of training runs, each in its own process (one at a time: two model processes
on a small CPU machine slow each other down far more than 2x), skips runs that already finished (so an
interrupted grid resumes), then writes a table with the mean and spread across seeds and two plots:
held-out reverse KL over training, and the gold win rate vs the reverse KL (the frontier).

- DPO and HyPO runs are `hypo train` runs; the sweep varies `beta` for DPO and `kl_coef` for HyPO.
- RLHF is `hypo.lab.lm.rlhf`: a reward model trained on the same pairs, then RLOO with a KL penalty on the
  same prompts, with the same batch shape, lengths, learning rate and step budget.
Every run evaluates the same way (`hypo.evaluation.held_out.evaluate_policy`): 64 held-out prompts x 2 samples,
reverse KL to the reference with its standard error, win rate against reference samples with a 95%
interval across prompts.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypo.evaluation.stats import mean_and_sd

METHODS = ("dpo", "hypo", "rlhf")
CENTER = {"dpo": (0.1, 0.0), "hypo": (0.1, 0.05), "rlhf": (0.0, 0.05)}
"""(beta, kl_coef) of each method's default setting, the one run with every seed."""
SWEEP = {"dpo": [(0.3, 0.0), (0.03, 0.0)], "hypo": [(0.1, 0.2), (0.1, 0.02)], "rlhf": [(0.0, 0.2), (0.0, 0.01)]}
"""The other points of each method's frontier (first seed only, to fit the machine-time budget), in the
order they run: every method's first extra point before any method's second."""


@dataclass(frozen=True)
class LMRun:
    """One training run of the grid. `beta` is DPO's; `kl_coef` is HyPO's online weight or RLHF's penalty."""

    method: str
    beta: float
    kl_coef: float
    seed: int

    @property
    def name(self) -> str:
        if self.method == "dpo":
            return f"dpo-beta{self.beta:g}-s{self.seed}"
        if self.method == "hypo":
            return f"hypo-beta{self.beta:g}-kl{self.kl_coef:g}-s{self.seed}"
        return f"rlhf-kl{self.kl_coef:g}-s{self.seed}"

    @property
    def setting(self) -> tuple[str, float, float]:
        return self.method, self.beta, self.kl_coef


@dataclass
class LMLabConfig:
    """The grid and what every run shares. `train_args` are extra `hypo train` options for every run, RLHF
    included (`hypo lab rlhf` takes the same options); the quick mode uses them for a tiny model."""

    seeds: tuple[int, ...] = (42, 43, 44)
    methods: tuple[str, ...] = METHODS
    max_steps: int = 30
    eval_steps: int = 10
    train_args: tuple[str, ...] = ()
    keep_models: bool = False

    @classmethod
    def quick(cls, model: str, pairs: str, prompts: str, eval_prompts: str) -> LMLabConfig:
        """A tiny model and data from the caller, two steps per run: seconds, for the tests."""
        return cls(seeds=(0, 1), max_steps=2, eval_steps=1, train_args=(
            "--model_name_or_path", model, "--dataset", pairs, "--prompts", prompts, "--eval_prompts", eval_prompts,
            "--judge", "review-sentiment", "--max_completion_length", "8", "--eval_max_prompts", "4",
            "--eval_max_prompts_during_training", "2", "--per_device_train_batch_size", "2",
            "--per_device_prompt_batch_size", "2"))

    def runs(self) -> list[LMRun]:
        """Every method's default setting with every seed (seed by seed), then the other sweep points with
        the first seed (point by point)."""
        grid = [LMRun(m, *CENTER[m], seed) for seed in self.seeds for m in self.methods]
        grid += [LMRun(m, *SWEEP[m][i], self.seeds[0]) for i in range(len(SWEEP["dpo"])) for m in self.methods]
        return grid


def run_command(run: LMRun, config: LMLabConfig, run_dir: Path, reward_model_dir: Path) -> list[str]:
    """The exact command line of one run (also written to commands.txt)."""
    common = ["--kl_coef", f"{run.kl_coef:g}", "--seed", str(run.seed), "--max_steps", str(config.max_steps),
              "--eval_steps", str(config.eval_steps), "--output_dir", str(run_dir), *config.train_args]
    if run.method == "rlhf":
        return [sys.executable, "-m", "hypo.cli", "lab", "rlhf", *common, "--reward_model_dir", str(reward_model_dir)]
    return [sys.executable, "-m", "hypo.cli", "train", "--method", run.method, "--beta", f"{run.beta:g}", *common]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "eval_results.json").is_file()


def execute(run: LMRun, config: LMLabConfig, runs_dir: Path, log=print) -> float:
    """Run one grid point unless it already finished; returns wall seconds (0 when skipped)."""
    run_dir = runs_dir / run.name
    if is_finished(run_dir):
        log(f"  {run.name}: done already, kept")
        return 0.0
    command = run_command(run, config, run_dir, runs_dir / f"reward-model-s{run.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"  {run.name}: {shlex.join(command)}")
    start = time.perf_counter()
    with (run_dir / "run.log").open("w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status != 0 or not is_finished(run_dir):
        raise RuntimeError(f"{run.name} failed (exit {status}); see {run_dir / 'run.log'}")
    (run_dir / "wall_seconds.json").write_text(json.dumps({"wall_seconds": seconds}))
    if not config.keep_models:
        shutil.rmtree(run_dir / "model", ignore_errors=True)
    return seconds


# --- collection ---------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What the table and plots need from one finished run folder."""

    run: LMRun
    metrics: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, reverse KL) evaluated during training
    step_seconds: float = math.nan  # median over the run's optimizer steps
    wall_seconds: float = math.nan
    reward_model_seconds: float = 0.0
    final_step: int = 0


def load_outcome(run: LMRun, run_dir: Path) -> RunOutcome:
    from hypo.evaluation.report import load_run

    loaded = load_run(run_dir)  # config.json, metrics.jsonl, eval_results.json
    evaluations = [r for r in loaded.records if "eval_objective/kl" in r]
    final_prompts = loaded.eval_metrics.get("num_prompts")
    # the curve: the evaluations during training, all on the same (smaller) number of prompts; the final
    # evaluation (more prompts) is drawn apart
    curve = [(r["step"], r["eval_objective/kl"]) for r in evaluations if r.get("eval_num_prompts") != final_prompts]
    steps = [r["time/step"] for r in loaded.records if "time/step" in r and r["step"] > 1]
    wall = json.loads((run_dir / "wall_seconds.json").read_text())["wall_seconds"] \
        if (run_dir / "wall_seconds.json").is_file() else math.nan
    step_seconds = statistics.median(steps) if steps else math.nan
    return RunOutcome(run, loaded.eval_metrics, sorted(set(curve)), step_seconds, wall,
                      loaded.config.get("reward_model_seconds", 0.0) or 0.0, loaded.steps)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sd across seeds of the values that exist (a run without timing gives nan)."""
    return mean_and_sd([v for v in values if not math.isnan(v)])


def summary_rows(outcomes: list[RunOutcome]) -> list[dict[str, Any]]:
    """One row per (method, beta, kl_coef): mean and sd across seeds of win rate, KL, judge score, time."""
    groups: dict[tuple, list[RunOutcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome.run.setting].append(outcome)
    rows = []
    for (method, beta, kl_coef), group in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0])):
        row: dict[str, Any] = {"method": method, "beta": beta if method != "rlhf" else None,
                               "kl_coef": kl_coef if method != "dpo" else None,
                               "seeds": " ".join(str(o.run.seed) for o in sorted(group, key=lambda o: o.run.seed))}
        for key in ("win_rate", "objective/kl", "objective/kl_k3", "judge/policy_score", "completions/mean_length"):
            row[key], row[key + "_sd"] = _mean_sd([o.metrics.get(key, math.nan) for o in group])
        row["win_rate_ci"] = [(o.metrics.get("win_rate_ci_low"), o.metrics.get("win_rate_ci_high")) for o in group]
        row["objective/kl_se"] = [o.metrics.get("objective/kl_se") for o in group]
        row["seconds_per_step"], _ = _mean_sd([o.step_seconds for o in group])
        row["wall_seconds"], _ = _mean_sd([o.wall_seconds for o in group])
        row["reward_model_seconds"], _ = _mean_sd([o.reward_model_seconds for o in group])
        rows.append(row)
    return rows


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} +- {sd:.{digits}f}"


def markdown_tables(rows: list[dict[str, Any]], outcomes: list[RunOutcome]) -> str:
    head = ("| method | beta | kl_coef | seeds | gold win rate vs reference | reverse KL (k1) | judge score | "
            "mean length | s/step | wall s/run | reward model s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        kl_coef = "" if r["kl_coef"] is None else f"{r['kl_coef']:g}"
        body += (f"| {r['method']} | {beta} | {kl_coef} | {r['seeds']} | "
                 f"{_fmt(r['win_rate'], r['win_rate_sd'])} | {_fmt(r['objective/kl'], r['objective/kl_sd'])} | "
                 f"{_fmt(r['judge/policy_score'], r['judge/policy_score_sd'])} | "
                 f"{_fmt(r['completions/mean_length'], math.nan, 1)} | {_fmt(r['seconds_per_step'], math.nan, 1)} | "
                 f"{_fmt(r['wall_seconds'], math.nan, 0)} | {_fmt(r['reward_model_seconds'], math.nan, 0)} |\n")
    runs = ("\n| run | win rate [95% CI] | reverse KL +- se | k3 +- se | judge score |\n|---|---|---|---|---|\n")
    for o in sorted(outcomes, key=lambda o: (METHODS.index(o.run.method), o.run.name)):
        m = o.metrics
        runs += (f"| {o.run.name} | {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] | "
                 f"{m['objective/kl']:.3f} +- {m['objective/kl_se']:.3f} | "
                 f"{m['objective/kl_k3']:.3f} +- {m['objective/kl_k3_se']:.3f} | {m['judge/policy_score']:.3f} |\n")
    return head + body + runs


COLORS = {"dpo": "tab:blue", "hypo": "tab:orange", "rlhf": "tab:green"}


def plot_kl_curves(outcomes: list[RunOutcome], path: Path) -> None:
    from hypo.evaluation.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled = set()
    for o in outcomes:
        if not o.curve:  # no evaluation during training (runs made before the grid): no curve to draw
            continue
        is_center = o.run.setting[1:] == CENTER[o.run.method]
        steps, kls = zip(*o.curve, strict=True)
        label = None if o.run.setting in labelled else o.run.name.rsplit("-s", 1)[0]
        labelled.add(o.run.setting)
        ax.plot(steps, kls, color=COLORS[o.run.method], alpha=0.9 if is_center else 0.45,
                linestyle="-" if is_center else "--", marker="o", markersize=3, label=label)
        ax.plot([o.final_step], [o.metrics["objective/kl"]], color=COLORS[o.run.method], marker="*", markersize=7,
                alpha=0.9 if is_center else 0.45, linestyle="none")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reverse KL to reference (held-out, k1)")
    ax.set_title("Reverse KL over training (solid: default setting; circles: evaluations during training on\n"
                 "fewer prompts, stars: the final evaluation)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lm_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    from hypo.evaluation.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["objective/kl"])
        if not points:
            continue
        xs, ys = [r["objective/kl"] for r in points], [r["win_rate"] for r in points]
        xerr = [0 if math.isnan(r["objective/kl_sd"]) else r["objective/kl_sd"] for r in points]
        yerr = [0 if math.isnan(r["win_rate_sd"]) else r["win_rate_sd"] for r in points]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, color=COLORS[method], marker="o", capsize=3, label=method)
        for r, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"b{r['beta']:g}" if method == "dpo" else f"kl{r['kl_coef']:g}", (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.axhline(0.5, color="gray", linewidth=0.8)
    ax.set_xlabel("reverse KL to reference (nats, held-out)")
    ax.set_ylabel("gold win rate vs reference")
    ax.set_title("Gold win rate vs reverse KL (error bars: sd across seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(config: LMLabConfig, runs_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Table and plots from every finished run of the grid; per-run results are copied next to them."""
    outcomes = []
    for run in config.runs():
        run_dir = runs_dir / run.name
        if not is_finished(run_dir):
            continue
        outcomes.append(load_outcome(run, run_dir))
        keep = out / "runs" / run.name
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.jsonl", "eval_results.json", "wall_seconds.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, keep / name)
    rows = summary_rows(outcomes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(markdown_tables(rows, outcomes))
    if outcomes:
        plot_kl_curves(outcomes, out / "kl_over_training.png")
        plot_lm_frontier(rows, out / "frontier.png")
    return rows


def run_lm_lab(config: LMLabConfig, runs_dir: Path, out: Path, collect_only: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the grid, then collect. The exact commands go to `<out>/commands.txt`."""
    out.mkdir(parents=True, exist_ok=True)
    runs = config.runs()
    commands = [shlex.join(run_command(r, config, runs_dir / r.name, runs_dir / f"reward-model-s{r.seed}"))
                for r in runs]
    (out / "commands.txt").write_text("\n".join(commands).replace(sys.executable, "python") + "\n")
    failed = []
    if not collect_only:
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {run.name}", flush=True)
            try:
                execute(run, config, runs_dir, log=lambda s: print(s, flush=True))
            except RuntimeError as error:  # one failed run does not stop the grid
                print(f"  {error}", flush=True)
                failed.append(run.name)
    rows = collect(config, runs_dir, out)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return rows
