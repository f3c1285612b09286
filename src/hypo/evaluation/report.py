"""`hypo report <run dirs...>`: one markdown table and a few plots comparing finished runs.

Each run folder holds what `hypo train` writes: `config.json`, `metrics.jsonl` (training records, and
`eval_`-prefixed evaluation records) and `eval_results.json` (held-out evaluation with standard errors).
The report gives every number with its uncertainty and sample count:

- win rate with its 95% interval and the number of prompts,
- judge score and reverse KL (k1) as mean +- standard error across prompts, with n,
- mean completion length and EOS rate +- standard error,
- training time: the sum of `time/step` over the logged steps.

Plots (PNG, matplotlib Agg): training curves (`loss/dpo`, `rewards/margins`, `objective/kl`, and
`eval_objective/kl` when evaluated during training), and judge score against reverse KL across runs
with standard-error bars (the reward-KL frontier).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CURVES = ("loss/dpo", "rewards/margins", "objective/kl")
EVAL_CURVE = "eval_objective/kl"
COLUMNS = ("run", "method", "beta", "kl_coef", "steps", "win rate [95% CI]", "judge score", "reverse KL (k1)",
           "n prompts / completions", "mean length", "EOS rate", "train time (s)")


@dataclass
class Run:
    """What the report reads from one run folder."""

    name: str
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    eval_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" in r]

    @property
    def steps(self) -> int:
        steps = [r["step"] for r in self.train_records]
        return max(steps) if steps else 0

    @property
    def train_seconds(self) -> float:
        return sum(r.get("time/step", 0.0) for r in self.train_records)


def load_run(path: str | Path) -> Run:
    """Read `config.json`, `metrics.jsonl` and (if present) `eval_results.json` from a run folder."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no config.json)")
    metrics_path = path / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    eval_path = path / "eval_results.json"
    eval_metrics = json.loads(eval_path.read_text())["metrics"] if eval_path.is_file() else {}
    return Run(path.name, path, json.loads(config_path.read_text()), records, eval_metrics)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed): every plot of hypo uses it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pm(metrics: dict[str, float], key: str, digits: int = 3) -> str:
    if key not in metrics:
        return "-"
    return f"{_num(metrics[key], digits)} ± {_num(metrics.get(f'{key}_se'), digits)}"


def table_row(run: Run) -> list[str]:
    """The cells of one run's row, in the order of `COLUMNS`."""
    m, c = run.eval_metrics, run.config
    win = "-" if "win_rate" not in m else \
        f"{_num(m['win_rate'])} [{_num(m['win_rate_ci_low'])}, {_num(m['win_rate_ci_high'])}]"
    if m.get("num_invalid"):  # judgments without a readable verdict: the win rate is over the others, or withheld
        valid = f"{int(m['num_completions'] - m['num_invalid'])}/{int(m['num_completions'])} valid"
        win = f"withheld ({valid})" if "win_rate" not in m else f"{win} ({valid})"
    counts = f"{int(m['num_prompts'])} / {int(m['num_completions'])}" if "num_prompts" in m else "-"
    kl_coef = _num(c.get("kl_coef")) if c.get("method") == "hypo" else "-"
    return [run.name, str(c.get("method", "-")), _num(c.get("beta")), kl_coef, str(run.steps), win,
            _pm(m, "judge/policy_score"), _pm(m, "objective/kl"), counts, _pm(m, "completions/mean_length", 1),
            _pm(m, "completions/eos_rate", 2), _num(run.train_seconds, 1)]


def markdown_table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(run)) + " |" for run in runs]
    return "\n".join(lines)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    rows = [r for r in records if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows], [r.get(f"{key}_se", math.nan) for r in rows]


def plot_training_curves(runs: list[Run], path: Path) -> Path:
    """One panel per metric, one line per run (evaluation KL with standard-error bars)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    keys = list(CURVES) + ([EVAL_CURVE] if any(_series(r.records, EVAL_CURVE)[0] for r in runs) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for run in runs:
            steps, values, errors = _series(run.train_records if key != EVAL_CURVE else run.records, key)
            if steps and key == EVAL_CURVE:
                ax.errorbar(steps, values, yerr=errors, marker="o", capsize=3, label=run.name)
            elif steps:
                ax.plot(steps, values, label=run.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_frontier(runs: list[Run], path: Path) -> Path | None:
    """Judge score against reverse KL, one point per run with standard-error bars; None without a judge."""
    points = [r for r in runs if "judge/policy_score" in r.eval_metrics and "objective/kl" in r.eval_metrics]
    if not points:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 4))
    for run in points:
        m = run.eval_metrics
        ax.errorbar(m["objective/kl"], m["judge/policy_score"], xerr=_finite(m.get("objective/kl_se")),
                    yerr=_finite(m.get("judge/policy_score_se")), fmt="o", capsize=3, label=run.name)
    ax.set_xlabel("reverse KL to reference (k1, nats)")
    ax.set_ylabel("judge score (policy)")
    ax.set_title("judge score vs KL (± se)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def write_report(run_dirs: list[str | Path], output_dir: str | Path = "report") -> Path:
    """Write `report.md`, `training_curves.png` and (with a judge) `frontier.png` into `output_dir`."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_training_curves(runs, output_dir / "training_curves.png")
    frontier = plot_frontier(runs, output_dir / "frontier.png")
    lines = ["# hypo report", "", f"{len(runs)} runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
             markdown_table(runs), "",
             "Win rate: policy against the reference under the judge, ties count half, 95% normal interval "
             "across prompts, over valid judgments (their count shown when some had no readable verdict). "
             "Scores, KL, length and EOS rate: mean ± standard error across prompts. "
             "Train time: sum of `time/step` over the logged steps.", "",
             "## Training curves", "", f"![training curves]({curves.name})", ""]
    if frontier is not None:
        lines += ["## Judge score vs reverse KL", "", f"![judge score vs KL]({frontier.name})", ""]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def eval_report_markdown(results: dict[str, Any], num_examples: int = 3) -> str:
    """`eval_report.md` of one evaluation: metrics with uncertainty and counts, settings, a few samples."""
    from hypo.evaluation.held_out import judge_label, win_rate_withheld

    m, settings = results["metrics"], results["settings"]
    baseline = "reference" if settings.get("baseline", "reference") == "reference" else "baseline"
    n = f"{int(m['num_prompts'])} prompts"
    rows = [("reverse KL to reference, k1 (nats)", _pm(m, "objective/kl"), n),
            ("reverse KL to reference, k3 (nats)", _pm(m, "objective/kl_k3"), n),
            ("policy mean length (tokens)", _pm(m, "completions/mean_length", 1), n),
            ("policy EOS rate", _pm(m, "completions/eos_rate", 2), n),
            (f"{baseline} mean length (tokens)", _pm(m, "reference/mean_length", 1), n)]
    pairs = valid = f"{n}, {int(m['num_completions'])} pairs"
    if m.get("num_invalid") or ("num_invalid" in m and judge_label(settings) == "LLM"):  # judges that can fail to read
        valid = f"{n}, {int(m['num_completions'] - m['num_invalid'])} valid pairs"
        rows.append(("invalid judgments (no readable verdict)",
                     f"{int(m['num_invalid'])} ({_num(m['invalid_rate'])})", pairs))
    if "win_rate" in m:
        rows.append((f"win rate vs {baseline} [95% CI]",
                     f"{_num(m['win_rate'])} [{_num(m['win_rate_ci_low'])}, {_num(m['win_rate_ci_high'])}]", valid))
        rows.append(("tie rate", _num(m["tie_rate"]), valid))
    elif "num_invalid" in m:
        rows.append((f"win rate vs {baseline} [95% CI]", "withheld: too few valid judgments", valid))
    if "judge/policy_score" in m:
        rows += [("judge score, policy", _pm(m, "judge/policy_score"), n),
                 (f"judge score, {baseline}", _pm(m, "judge/reference_score"), n)]
    lines = ["# Evaluation", "", "| metric | value | n |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {count} |" for name, value, count in rows]
    lines += ["", "Mean ± standard error across prompts (the samples of one prompt are averaged first); win rate "
              "of the policy against the baseline under the judge, ties counted half, 95% normal interval, over "
              "valid judgments only (an invalid one, whose judge replies had no readable verdict, is neither a "
              f"win, a loss nor a tie). Baseline: `{settings.get('baseline', 'reference')}`.", ""]
    withheld = win_rate_withheld(m, settings)
    if withheld:
        lines += [f"**{withheld[0].upper()}{withheld[1:]}.**", ""]
    lines += ["## Settings", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    lines += ["", "## Examples", ""]
    for row in results["samples"][:num_examples]:
        verdict = "" if "win" not in row else " (invalid judgment)" if row["win"] is None else f" (win {row['win']})"
        lines += [f"**Prompt:** {_quote(row['prompt'])}", "", f"- policy{verdict}: {_quote(row['policy_text'])}",
                  f"- {baseline}: {_quote(row['reference_text'])}", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return " ".join(str(text).split()) or "(empty)"
