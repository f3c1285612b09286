"""Tables of `hypo lab coverage-controls` from its per-run JSON files: the preregistered primary endpoint and its
interaction with coverage, every label-free recipe of both methods, the equal-budget tuned picks (and the picks a
gold oracle would make, reported beside them), matched reverse KL inside DPO's failure region, and when DPO's KL
breaks away under each coverage. Writes `summary.md`, `summary.json` and `curves.png` (docs/coverage-lab-controls.md).

Sign convention: every difference is HyPO - DPO (positive: HyPO better), or partial - full.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypo.lab.coverage_controls.analysis import (
    GOLD_WORLDS,
    argmin_index,
    hierarchical_bootstrap,
    interpolate_step,
    kl_budget_index,
    pick_within_budget,
    reading,
    world_t_interval,
    worst_consistent_win,
)
from hypo.lab.partial_coverage.analysis import interpolate_at_kl, minimum_detectable_difference

PRIMARY_HYPO = "hypo-kl0.01"
"""HyPO's default setting (part 3's kl_coef 0.01), read at its final checkpoint; its final KL is the budget."""
PRIMARY_DPO = "dpo-b0.1"
"""DPO's default setting (part 3's), stopped at the KL budget."""
RULES = ("final", "kl_budget", "heldout_loss")
"""Label-free checkpoint rules: the last checkpoint; the last one before the held-out sampled KL first exceeds the
budget; the lowest held-out pair loss (at the run's own beta)."""
MATCHED_KL_LEVELS = (1.0, 3.0, 10.0, 30.0, 100.0)
FAILURE_LEVELS = (10.0, 30.0, 100.0)
"""Levels inside DPO's failure region (preregistered decision levels of the matched-KL comparison)."""
BREAK_AWAY_KL = 10.0
"""The reverse KL (nats) at which a run counts as breaking away (DPO's KL jumps from ~4 to ~18-300 in part 3)."""
TABLE_STEPS = (0, 64, 128, 160, 192, 224, 256)


# --- loading ------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One run's evaluations in step order, the reference first (step 0). Metric lists have one entry per point."""

    steps: list[int]
    kl: list[float]
    worst: list[float]
    """Win rate in the worst gold world consistent with the coverage's data."""
    ignore: list[float]
    off_range: list[float]
    eos_rate: list[float]
    heldout_loss: list[float]
    heldout_accuracy: list[float]
    evaluations: list[dict]

    @classmethod
    def of(cls, reference: dict, result: dict, coverage: str) -> Trajectory:
        evals = [reference, *sorted(result["checkpoints"], key=lambda c: c["step"])]
        wins = [{w: e["worlds"][w]["win_rate"][0] for w in GOLD_WORLDS} for e in evals]
        losses = [e["heldout"]["loss"] for e in evals]  # the reference's: log 2 at any beta
        return cls(steps=[e["step"] for e in evals], kl=[e["kl"][0] for e in evals],
                   worst=[worst_consistent_win(w, coverage) for w in wins], ignore=[w["ignore"] for w in wins],
                   off_range=[e["off_range"][0] for e in evals], eos_rate=[e["eos_rate"] for e in evals],
                   heldout_loss=losses, heldout_accuracy=[e["heldout"]["accuracy"] for e in evals], evaluations=evals)

    def select(self, rule: str, budget: float) -> int:
        if rule == "final":
            return len(self.steps) - 1
        if rule == "kl_budget":
            return kl_budget_index(self.kl, budget)
        if rule == "heldout_loss":
            return argmin_index(self.heldout_loss, start=1)
        raise ValueError(f"unknown rule {rule!r}")


@dataclass
class Grid:
    """Every trajectory by (coverage, setting) as a (W, S) table of Trajectory (None where a run is missing)."""

    worlds: list[int]
    seeds: list[int]
    coverages: list[str]
    settings: list[str]
    runs: dict[tuple[str, str], list[list[Trajectory | None]]]

    def method_settings(self, method: str) -> list[str]:
        return [s for s in self.settings if s.startswith(method)]

    def budgets(self, coverage: str) -> np.ndarray:
        """(W, S) KL budgets: the final held-out KL of the paired PRIMARY_HYPO run (NaN if missing)."""
        table = self.runs.get((coverage, PRIMARY_HYPO))
        return np.array([[t.kl[-1] if t else np.nan for t in row] for row in table]) if table else \
            np.full((len(self.worlds), len(self.seeds)), np.nan)


def load_grid(out: Path) -> Grid | None:
    references = {}
    for path in sorted((out / "reference").glob("*.json")) if (out / "reference").is_dir() else []:
        ref = json.loads(path.read_text())
        references[(ref["world_seed"], ref["coverage"])] = ref
    results = []
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []:
        results.append(json.loads(path.read_text()))
    if not results:
        return None
    worlds = sorted({r["world_seed"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    coverages = [c for c in ("partial", "full") if any(r["coverage"] == c for r in results)]
    settings = list(dict.fromkeys(r["setting"]["name"] for r in sorted(
        results, key=lambda r: (r["setting"]["method"], -r["setting"]["kl_coef"], r["setting"]["beta"],
                                r["setting"]["lr_scheduler_type"]))))
    runs: dict[tuple[str, str], list[list[Trajectory | None]]] = defaultdict(
        lambda: [[None] * len(seeds) for _ in worlds])
    for r in results:
        reference = references.get((r["world_seed"], r["coverage"]))
        if reference is None:
            continue
        table = runs[(r["coverage"], r["setting"]["name"])]
        table[worlds.index(r["world_seed"])][seeds.index(r["seed"])] = Trajectory.of(reference, r, r["coverage"])
    return Grid(worlds, seeds, coverages, settings, dict(runs))


# --- the analyses -------------------------------------------------------------------------------------------------


def _table(grid: Grid, coverage: str, setting: str, fn) -> np.ndarray:
    """(W, S) of fn(trajectory, budget) over the runs of one setting (NaN where missing)."""
    table = grid.runs.get((coverage, setting))
    budgets = grid.budgets(coverage)
    if table is None:
        return np.full((len(grid.worlds), len(grid.seeds)), np.nan)
    return np.array([[fn(t, budgets[w, s]) if t is not None else np.nan for s, t in enumerate(row)]
                     for w, row in enumerate(table)], dtype=float)


def recipe_values(grid: Grid, coverage: str, setting: str, rule: str, metric: str = "worst") -> np.ndarray:
    """(W, S) of `metric` at the checkpoint `rule` picks (NaN where the run or the budget is missing)."""
    def value(t: Trajectory, budget: float) -> float:
        if rule == "kl_budget" and np.isnan(budget):
            return np.nan
        return float(getattr(t, metric)[t.select(rule, budget)] if metric != "step" else t.steps[t.select(rule, budget)])

    return _table(grid, coverage, setting, value)


def compare(a: np.ndarray, b: np.ndarray, seed: int = 0, *, ahead: str = "HyPO", behind: str = "DPO") -> dict[str, Any]:
    """a - b, paired by world and seed: hierarchical bootstrap, the t-interval over worlds, and the reading (which
    names a `ahead` and b `behind`)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    boot = hierarchical_bootstrap(diff, seed=seed)
    return {**boot, "t": world_t_interval(diff), "reading": reading(boot["low"], boot["high"], ahead=ahead,
                                                                      behind=behind),
            "per_world": [float(np.nanmean(row)) if np.any(~np.isnan(row)) else float("nan") for row in diff]}


def describe(values: np.ndarray, seed: int = 0) -> dict[str, float]:
    boot = hierarchical_bootstrap(values, seed=seed)
    return {k: boot[k] for k in ("estimate", "low", "high", "runs")}


def primary(grid: Grid) -> dict[str, Any]:
    """The preregistered primary endpoint: worst-consistent-world win rate of PRIMARY_HYPO (final) minus that of
    PRIMARY_DPO stopped at the KL budget, per coverage, and its interaction (partial - full); the same in the
    ignore world (the one gold world consistent with both coverages) as a secondary."""
    out: dict[str, Any] = {}
    for metric in ("worst", "ignore"):
        diffs = {c: recipe_values(grid, c, PRIMARY_HYPO, "final", metric)
                 - recipe_values(grid, c, PRIMARY_DPO, "kl_budget", metric) for c in grid.coverages}
        block = {c: compare(d, 0) for c, d in diffs.items()}
        if set(diffs) == {"partial", "full"}:
            block["interaction"] = compare(diffs["partial"], diffs["full"])
        block["power"] = {c: minimum_detectable_difference(block[c]["se"]) for c in grid.coverages}
        out[metric] = block
    return out


def recipes(grid: Grid) -> dict[str, list[dict[str, Any]]]:
    """Every (setting, rule) per coverage: mean worst-consistent win rate, ignore win, KL, off-range and step at the
    chosen checkpoint (bootstrap intervals), and the paired difference to PRIMARY_HYPO at its final checkpoint."""
    out = {}
    for c in grid.coverages:
        anchor = recipe_values(grid, c, PRIMARY_HYPO, "final")
        rows = []
        for setting in grid.settings:
            for rule in RULES:
                values = recipe_values(grid, c, setting, rule)
                if np.all(np.isnan(values)):
                    continue
                rows.append({"setting": setting, "rule": rule, "worst": describe(values),
                             **{m: float(np.nanmean(recipe_values(grid, c, setting, rule, m)))
                                for m in ("ignore", "kl", "off_range", "step")},
                             "primary_hypo_minus_this": compare(anchor, values, ahead=PRIMARY_HYPO,
                                                                behind="this recipe")})
        out[c] = rows
    return out


def tuned_picks(grid: Grid) -> dict[str, Any]:
    """Equal tuning budget. Label-free: per run cell, each method stops every one of its settings at the KL budget
    and keeps the checkpoint that spends most of it, the largest KL (`pick_within_budget`). Gold oracle (reported
    beside it, not label-free): the one (setting, rule) per method and coverage with the highest mean
    worst-consistent win rate over all runs. With both coverages, the label-free difference's partial - full
    interaction too (paired by world and seed; not preregistered)."""
    out: dict[str, Any] = {}
    label_free_diffs = {}
    for c in grid.coverages:
        budgets = grid.budgets(c)
        picks: dict[str, Any] = {}
        for method in ("hypo", "dpo"):
            names = [n for n in grid.method_settings(method) if (c, n) in grid.runs]
            values = np.full((len(grid.worlds), len(grid.seeds)), np.nan)
            kls, chosen = np.full_like(values, np.nan), defaultdict(int)
            for w in range(len(grid.worlds)):
                for s in range(len(grid.seeds)):
                    trajs = [grid.runs[(c, n)][w][s] for n in names]
                    if not trajs or any(t is None for t in trajs) or np.isnan(budgets[w, s]):
                        continue
                    k, i = pick_within_budget([t.kl for t in trajs], float(budgets[w, s]))
                    values[w, s], kls[w, s] = trajs[k].worst[i], trajs[k].kl[i]
                    chosen[f"{names[k]} step {trajs[k].steps[i]}"] += 1
            oracle = max(((np.nanmean(recipe_values(grid, c, n, r)), n, r) for n in names for r in RULES
                          if not np.all(np.isnan(recipe_values(grid, c, n, r)))), default=None)
            picks[method] = {"label_free": values, "label_free_kl": float(np.nanmean(kls)), "settings": names,
                             "label_free_choices": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
                             "oracle": None if oracle is None else {"setting": oracle[1], "rule": oracle[2],
                                                                     "values": recipe_values(grid, c, oracle[1],
                                                                                             oracle[2])}}
        block = {"label_free": {"hypo": describe(picks["hypo"]["label_free"]),
                                "dpo": describe(picks["dpo"]["label_free"]),
                                "hypo_kl": picks["hypo"]["label_free_kl"], "dpo_kl": picks["dpo"]["label_free_kl"],
                                "hypo_settings": picks["hypo"]["settings"], "dpo_settings": picks["dpo"]["settings"],
                                "hypo_choices": picks["hypo"]["label_free_choices"],
                                "dpo_choices": picks["dpo"]["label_free_choices"],
                                "diff": compare(picks["hypo"]["label_free"], picks["dpo"]["label_free"])}}
        if picks["hypo"]["oracle"] and picks["dpo"]["oracle"]:
            block["oracle"] = {m: {k: picks[m]["oracle"][k] for k in ("setting", "rule")} |
                               {"worst": describe(picks[m]["oracle"]["values"])} for m in ("hypo", "dpo")}
            block["oracle"]["diff"] = compare(picks["hypo"]["oracle"]["values"], picks["dpo"]["oracle"]["values"])
        out[c] = block
        label_free_diffs[c] = picks["hypo"]["label_free"] - picks["dpo"]["label_free"]
    if set(label_free_diffs) == {"partial", "full"}:
        out["partial - full"] = {"label_free": compare(label_free_diffs["partial"] - label_free_diffs["full"], 0)}
    return out


def matched_kl(grid: Grid) -> dict[str, list[dict[str, Any]]]:
    """PRIMARY_DPO against every constant-learning-rate HyPO setting at fixed reverse-KL levels: each run's
    worst-consistent win rate, ignore win rate and off-range rate interpolated where its KL trajectory first
    reaches the level; pairs where either run never reaches it are left out (counted)."""
    out = {}
    for c in grid.coverages:
        rows = []
        for hypo in [n for n in grid.method_settings("hypo") if not n.endswith("-linear")]:
            for level in MATCHED_KL_LEVELS:
                def at_level(t: Trajectory, _budget: float, metric: str, level=level) -> float:
                    value = interpolate_at_kl(t.kl, np.asarray(getattr(t, metric), dtype=float)[:, None], level)
                    return np.nan if value is None else float(value[0])

                values = {}
                for name in (hypo, PRIMARY_DPO):
                    values[name] = {m: _table(grid, c, name, lambda t, b, m=m: at_level(t, b, m))
                                    for m in ("worst", "ignore", "off_range", "steps")}
                both = ~np.isnan(values[hypo]["worst"]) & ~np.isnan(values[PRIMARY_DPO]["worst"])
                if not both.any():
                    rows.append({"hypo": hypo, "level": level, "pairs": 0})
                    continue
                masked = {n: {m: np.where(both, v, np.nan) for m, v in vs.items()} for n, vs in values.items()}
                rows.append({"hypo": hypo, "level": level, "pairs": int(both.sum()),
                             "hypo_reach": int((~np.isnan(values[hypo]["worst"])).sum()),
                             "dpo_reach": int((~np.isnan(values[PRIMARY_DPO]["worst"])).sum()),
                             "hypo_step": float(np.nanmean(masked[hypo]["steps"])),
                             "dpo_step": float(np.nanmean(masked[PRIMARY_DPO]["steps"])),
                             "hypo_worst": float(np.nanmean(masked[hypo]["worst"])),
                             "dpo_worst": float(np.nanmean(masked[PRIMARY_DPO]["worst"])),
                             "hypo_off_range": float(np.nanmean(masked[hypo]["off_range"])),
                             "dpo_off_range": float(np.nanmean(masked[PRIMARY_DPO]["off_range"])),
                             "worst": compare(masked[hypo]["worst"], masked[PRIMARY_DPO]["worst"]),
                             "ignore": compare(masked[hypo]["ignore"], masked[PRIMARY_DPO]["ignore"]),
                             "off_range": compare(masked[hypo]["off_range"], masked[PRIMARY_DPO]["off_range"])})
        out[c] = rows
    return out


def break_away(grid: Grid, setting: str = PRIMARY_DPO) -> dict[str, Any]:
    """One setting under each coverage: the step where its KL first reaches BREAK_AWAY_KL (interpolated; NaN if
    never), the final KL (mean, median, range), off-range and EOS rates and ignore-world win rate, and
    partial - full paired."""
    out: dict[str, Any] = {}
    per = {}
    for c in grid.coverages:
        if (c, setting) not in grid.runs:  # a key holds at least one run (load_grid)
            continue
        per[c] = {"step": _table(grid, c, setting, lambda t, b: interpolate_step(t.steps, t.kl, BREAK_AWAY_KL)),
                  "final_kl": _table(grid, c, setting, lambda t, b: t.kl[-1]),
                  "final_off_range": _table(grid, c, setting, lambda t, b: t.off_range[-1]),
                  "final_eos_rate": _table(grid, c, setting, lambda t, b: t.eos_rate[-1]),
                  "final_ignore": _table(grid, c, setting, lambda t, b: t.ignore[-1]),
                  "best_ignore": _table(grid, c, setting, lambda t, b: max(t.ignore))}
        final_kl = per[c]["final_kl"]
        out[c] = {"runs": int((~np.isnan(final_kl)).sum()),
                  "reached": int((~np.isnan(per[c]["step"])).sum()),
                  "final_kl_over_100": int((final_kl > 100).sum()),
                  **{k: describe(v) for k, v in per[c].items()},
                  "final_kl_median": float(np.nanmedian(final_kl)),
                  "final_kl_range": [float(np.nanmin(final_kl)), float(np.nanmax(final_kl))]}
    if set(per) == {"partial", "full"}:
        out["partial_minus_full"] = {k: compare(per["partial"][k], per["full"][k]) for k in per["partial"]}
    return out


def break_away_order(grid: Grid) -> list[str]:
    """PRIMARY_DPO, DPO's other settings, then HyPO's (for comparison)."""
    dpo = [PRIMARY_DPO, *(s for s in grid.method_settings("dpo") if s != PRIMARY_DPO)]
    return [*dpo, *grid.method_settings("hypo")]


def trajectories(grid: Grid) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Per coverage and setting, the mean over runs of each metric at the steps of TABLE_STEPS."""
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for c in grid.coverages:
        out[c] = {}
        for setting in grid.settings:
            table = grid.runs.get((c, setting))
            runs = [t for row in table for t in row if t is not None] if table else []
            if not runs:
                continue
            rows = []
            for step in TABLE_STEPS:
                points = [t.steps.index(step) for t in runs if step in t.steps]
                if len(points) != len(runs):
                    continue
                row = {"step": step}
                for m in ("kl", "worst", "ignore", "off_range", "eos_rate", "heldout_loss", "heldout_accuracy"):
                    row[m] = float(np.mean([getattr(t, m)[i] for t, i in zip(runs, points, strict=True)]))
                for w in GOLD_WORLDS:
                    row[f"win_{w}"] = float(np.mean([t.evaluations[i]["worlds"][w]["win_rate"][0]
                                                     for t, i in zip(runs, points, strict=True)]))
                rows.append(row)
            out[c][setting] = rows
    return out


def analyse(out: Path) -> dict[str, Any]:
    grid = load_grid(out)
    if grid is None:
        return {"runs": 0}
    runs = sum(t is not None for table in grid.runs.values() for row in table for t in row)
    summary: dict[str, Any] = {"runs": runs, "worlds": grid.worlds, "seeds": grid.seeds, "coverages": grid.coverages,
                               "settings": grid.settings, "trajectories": trajectories(grid)}
    names = set(grid.settings)
    if {PRIMARY_HYPO, PRIMARY_DPO} <= names:
        summary |= {"primary": primary(grid), "recipes": recipes(grid), "tuned": tuned_picks(grid),
                    "matched_kl": matched_kl(grid),
                    "break_away": {setting: break_away(grid, setting) for setting in break_away_order(grid)}}
    return summary


# --- markdown -----------------------------------------------------------------------------------------------------


def _ci(d: dict, digits: int = 3) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _mean_ci(d: dict, digits: int = 3) -> str:
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _t(d: dict, digits: int = 3) -> str:
    return f"[{d['t']['low']:+.{digits}f}, {d['t']['high']:+.{digits}f}]"


def _primary_lines(block: dict, coverages: list[str], label: str) -> list[str]:
    lines = [f"| {label} | estimate [95% bootstrap, worlds then seeds] | t-interval over world means | reading | "
             "per world |", "|---|---|---|---|---|"]
    for key in [*coverages, "interaction"]:
        if key in block:
            d = block[key]
            name = "partial - full (interaction)" if key == "interaction" else key
            lines.append(f"| {name} | {_ci(d)} | {_t(d)} | {d['reading']} | "
                         + ", ".join(f"{v:+.3f}" for v in d["per_world"]) + " |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Coverage lab, part 4 (controls): results", "",
             f"{summary['runs']} runs: worlds {summary['worlds']}, training seeds {summary['seeds']}, coverages "
             f"{summary['coverages']}, settings {summary['settings']}.", "",
             "Win rates are against the reference's samples (ties half). \"worst\": the win rate in the worst gold "
             "world consistent with the data (partial coverage: the lowest of penalize, ignore, reward; full "
             "coverage: ignore). Differences are HyPO - DPO (positive: HyPO better) unless named otherwise, paired "
             "by world and seed; intervals: 95% percentile bootstrap over worlds, then seeds within worlds "
             "(10,000 replicates), and beside it a t-interval over the world means.", ""]
    if "primary" in summary:
        p = summary["primary"]
        lines += ["## Primary endpoint", "",
                  f"{PRIMARY_HYPO} at its final checkpoint minus {PRIMARY_DPO} stopped at the KL budget (the last "
                  f"checkpoint before its held-out sampled KL first exceeds the final KL of the paired {PRIMARY_HYPO} "
                  "run).", ""]
        lines += _primary_lines(p["worst"], summary["coverages"], "worst consistent world")
        lines += ["", "Secondary, the ignore world (consistent with both coverages):", ""]
        lines += _primary_lines(p["ignore"], summary["coverages"], "ignore world")
        lines += ["", "Power: the smallest true difference detected with 80% power at 5%, (1.96 + 0.84) x bootstrap "
                  "se: " + ", ".join(f"{c} {v:.3f}" for c, v in p["worst"]["power"].items()) + " (worst world).", ""]
        lines += ["## Every label-free recipe", "",
                  "Each setting read at the checkpoint each rule picks: final; kl_budget (the paired "
                  f"{PRIMARY_HYPO} run's final KL); heldout_loss (the lowest held-out pair loss, at the run's own "
                  f"beta). Last column: {PRIMARY_HYPO} (final) minus this recipe.", ""]
        for c, rows in summary["recipes"].items():
            lines += [f"### {c} coverage", "", "| setting | rule | worst [95%] | ignore | KL | off-range | step | "
                      f"{PRIMARY_HYPO} - this [95%] | reading |", "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                d = r["primary_hypo_minus_this"]
                lines.append(f"| {r['setting']} | {r['rule']} | {_mean_ci(r['worst'])} | {r['ignore']:.3f} | "
                             f"{r['kl']:.2f} | {r['off_range']:.3f} | {r['step']:.0f} | {_ci(d)} | "
                             f"{d['reading']} |")
            lines.append("")
        lines += ["## Equal tuning budget: each method's pick", "",
                  "Label-free: every setting of the method stopped at the KL budget, then the checkpoint that spends "
                  "most of it (the largest held-out KL). Gold oracle (not label-free, reported beside it): the (setting, "
                  "rule) with the highest mean worst-consistent win rate over all runs of the coverage.", "",
                  "| coverage | pick | HyPO | DPO | HyPO - DPO [95%] | t-interval | reading |",
                  "|---|---|---|---|---|---|---|"]
        for c in summary["coverages"]:
            block = summary["tuned"][c]
            lf = block["label_free"]
            lines.append(f"| {c} | label-free over {len(lf['hypo_settings'])} + {len(lf['dpo_settings'])} settings "
                         f"(mean KL HyPO {lf['hypo_kl']:.2f}, DPO {lf['dpo_kl']:.2f}) | "
                         f"{_mean_ci(lf['hypo'])} | {_mean_ci(lf['dpo'])} | {_ci(lf['diff'])} | {_t(lf['diff'])} | "
                         f"{lf['diff']['reading']} |")
            if "oracle" in block:
                o = block["oracle"]
                lines.append(f"| {c} | gold oracle: HyPO {o['hypo']['setting']} {o['hypo']['rule']}, DPO "
                             f"{o['dpo']['setting']} {o['dpo']['rule']} | {_mean_ci(o['hypo']['worst'])} | "
                             f"{_mean_ci(o['dpo']['worst'])} | {_ci(o['diff'])} | {_t(o['diff'])} | "
                             f"{o['diff']['reading']} |")
        if "partial - full" in summary["tuned"]:
            d = summary["tuned"]["partial - full"]["label_free"]
            lines.append(f"| partial - full (interaction; not preregistered) | label-free | | | {_ci(d)} | {_t(d)} | "
                         f"{d['reading']} |")
        lines.append("")
        for c in summary["coverages"]:
            for m in ("hypo", "dpo"):
                lines.append(f"- {c}, {m} label-free choices (runs): " + ", ".join(
                    f"{k} ({v})" for k, v in summary["tuned"][c]["label_free"][f"{m}_choices"].items()))
        lines += ["", "## Matched reverse KL", "",
                  f"{PRIMARY_DPO} against each constant-rate HyPO setting where both runs of a (world, seed) reach "
                  "the level (values interpolated along each run's trajectory at its first crossing). Off-range: "
                  "HyPO - DPO (negative: HyPO stays more in range).", ""]
        for c, rows in summary["matched_kl"].items():
            lines += [f"### {c} coverage", "", "| HyPO setting | KL | pairs (HyPO, DPO reach) | step HyPO / DPO | "
                      "worst HyPO / DPO | worst HyPO - DPO [95%] | reading | off-range HyPO / DPO | off-range "
                      "HyPO - DPO [95%] |", "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                if not r["pairs"]:
                    lines.append(f"| {r['hypo']} | {r['level']:g} | 0 | | | | not reached | | |")
                    continue
                lines.append(f"| {r['hypo']} | {r['level']:g} | {r['pairs']} ({r['hypo_reach']}, {r['dpo_reach']}) | "
                             f"{r['hypo_step']:.0f} / {r['dpo_step']:.0f} | {r['hypo_worst']:.3f} / "
                             f"{r['dpo_worst']:.3f} | {_ci(r['worst'])} | {r['worst']['reading']} | "
                             f"{r['hypo_off_range']:.3f} / {r['dpo_off_range']:.3f} | {_ci(r['off_range'])} |")
            lines.append("")
        lines += ["## When DPO breaks away", "",
                  f"Each setting (DPO's first, HyPO's for comparison): the runs whose held-out KL reaches "
                  f"{BREAK_AWAY_KL:g} nats, the mean step at which they first do (interpolated between checkpoints), "
                  "and the final state (means over runs).", "",
                  "| setting | coverage | runs reaching | step reached | final KL mean / median (range) | "
                  "runs ending above 100 nats | final off-range | final EOS rate | final ignore win | "
                  "best ignore win |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for setting, b in summary["break_away"].items():
            for c in summary["coverages"]:
                if c not in b:
                    continue
                r = b[c]
                step = f"{r['step']['estimate']:.0f}" if r["reached"] else "-"
                lines.append(f"| {setting} | {c} | {r['reached']} of {r['runs']} | {step} | "
                             f"{r['final_kl']['estimate']:.1f} / {r['final_kl_median']:.1f} "
                             f"({r['final_kl_range'][0]:.1f}-{r['final_kl_range'][1]:.1f}) | "
                             f"{r['final_kl_over_100']} | {r['final_off_range']['estimate']:.3f} | "
                             f"{r['final_eos_rate']['estimate']:.3f} | {r['final_ignore']['estimate']:.3f} | "
                             f"{r['best_ignore']['estimate']:.3f} |")
        b = summary["break_away"][PRIMARY_DPO]
        if "partial_minus_full" in b:
            lines += ["", f"{PRIMARY_DPO}, partial - full, paired: " + "; ".join(
                f"{k} {_ci(v, 3 if 'step' not in k and 'kl' not in k else 1)}"
                for k, v in b["partial_minus_full"].items()) + " (step: runs where both reach the level)."]
        lines.append("")
    lines += ["## Over training (mean over runs)", ""]
    for c, by_setting in summary["trajectories"].items():
        lines += [f"### {c} coverage", "", "| setting | step | KL | worst | win penalize / ignore / reward | "
                  "off-range | EOS | held-out loss | held-out acc. |", "|---|---|---|---|---|---|---|---|---|"]
        for setting, rows in by_setting.items():
            for r in rows:
                lines.append(f"| {setting} | {r['step']} | {r['kl']:.2f} | {r['worst']:.3f} | "
                             f"{r['win_penalize']:.3f} / {r['win_ignore']:.3f} / {r['win_reward']:.3f} | "
                             f"{r['off_range']:.3f} | {r['eos_rate']:.3f} | {r['heldout_loss']:.3f} | "
                             f"{r['heldout_accuracy']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.floating | float):
        value = float(value)
        return None if np.isnan(value) else round(value, 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def plot(out: Path, grid: Grid) -> None:
    """`curves.png`: per coverage (rows), each run's worst-consistent win rate over training, against the reverse
    KL (log scale), and its off-range rate against the reverse KL; one colour per setting."""
    from hypo.evaluation.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(grid.coverages), 3, figsize=(15, 4.0 * len(grid.coverages)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, c in zip(axes, grid.coverages, strict=True):
        for k, setting in enumerate(grid.settings):
            table = grid.runs.get((c, setting))
            runs = [t for r in table for t in r if t is not None] if table else []
            for i, t in enumerate(runs):
                label = setting if i == 0 else None
                style = {"color": colors[k % len(colors)], "alpha": 0.35, "linewidth": 0.8,
                         "linestyle": "--" if setting.endswith("-linear") else "-"}
                row[0].plot(t.steps, t.worst, label=label, **style)
                row[1].plot(t.kl[1:], t.worst[1:], marker=".", markersize=2, label=label, **style)
                row[2].plot(t.kl[1:], t.off_range[1:], marker=".", markersize=2, label=label, **style)
        row[0].set(xlabel="optimizer step", ylabel=f"worst consistent world win rate ({c})")
        row[1].set(xlabel="reverse KL (nats, log)", ylabel="worst consistent world win rate", xscale="log")
        row[2].set(xlabel="reverse KL (nats, log)", ylabel="off-range rate", xscale="log")
        row[0].legend(fontsize=6)
    fig.suptitle("Coverage lab, part 4: one line per run (held-out prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def write_report(out: Path, config=None, plots: bool = True) -> dict[str, Any]:
    """summary.json, summary.md and (with plots) curves.png from the JSON files under `out`."""
    summary = _plain(analyse(out))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(_restore_nan(summary)))
    grid = load_grid(out) if plots else None
    if grid is not None:
        plot(out, grid)
    return summary


def _restore_nan(value):
    """JSON's null back to NaN for the markdown (the same numbers the JSON holds, so both agree)."""
    if isinstance(value, dict):
        return {k: _restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return float("nan") if value is None else value
