"""Pure analysis of `hypo lab coverage-controls` (docs/coverage-lab-controls.md): the worst gold world consistent
with the data, label-free checkpoint selection (a KL budget, the held-out pair loss), the hierarchical paired
bootstrap over worlds then seeds, a t-interval over world means, and the preregistered reading of an interval.
NumPy only; every function has a test on hand-computed inputs (tests/test_lab_coverage_controls.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

GOLD_WORLDS = ("penalize", "ignore", "reward")
CONSISTENT_WORLDS = {"partial": GOLD_WORLDS, "full": ("ignore",)}
"""The gold worlds that agree with each coverage's labels: under partial coverage the pairs never vary the length
outside [8, 12], so all three agree on every pair; under full coverage the labels follow the number of positive
words on every length, which only "ignore" does."""
SMALLEST_EFFECT = 0.03
"""Win-rate difference below which two methods are called equivalent (when the whole interval lies within it)."""
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% quantiles of Student's t by degrees of freedom."""


def worst_consistent_win(win_rates: Mapping[str, float], coverage: str) -> float:
    """The lowest win rate over the gold worlds consistent with the coverage's data.

    Example: {"penalize": 0.2, "ignore": 0.9, "reward": 0.95} -> 0.2 (partial), 0.9 (full).
    """
    return min(win_rates[w] for w in CONSISTENT_WORLDS[coverage])


def kl_budget_index(kls: Sequence[float], budget: float) -> int:
    """Label-free stopping at a KL budget: the last evaluation before the first one whose reverse KL exceeds
    `budget` (what a run that stops when its evaluated KL passes the budget keeps); the last index if none does.
    Index 0 is the reference (KL 0).

    Example: kls [0, 1, 3, 6, 4], budget 5 -> 2 (it stops at the 6 and never sees the 4); budget 7 -> 4.
    """
    for i, kl in enumerate(kls):
        if kl > budget:
            return max(0, i - 1)
    return len(kls) - 1


def argmin_index(values: Sequence[float], start: int = 0) -> int:
    """The first index (from `start`) of the smallest value: the best checkpoint by held-out pair loss.

    Example: [0.69, 0.5, 0.4, 0.4, 0.6], start 1 -> 2.
    """
    values = list(values)
    best = start
    for i in range(start, len(values)):
        if values[i] < values[best]:
            best = i
    return best


def pick_within_budget(kls: Sequence[Sequence[float]], budget: float) -> tuple[int, int]:
    """A method's label-free choice among its settings at a KL budget ("spend the budget"): every setting is
    stopped at the budget (`kl_budget_index`), and among the checkpoints the settings keep (the reference only
    when nothing else is kept) the one with the largest reverse KL wins; ties go to the earlier setting, then the
    earlier checkpoint. Returns (setting index, checkpoint index).

    Example: kls [[0, 2, 9], [0, 1, 3]], budget 5 -> (1, 2) (KL 3; the 9 is over budget, so setting 0 keeps 2);
    budget 10 -> (0, 2).
    """
    best: tuple[float, int, int] | None = None
    for k, kl in enumerate(kls):
        stop = kl_budget_index(kl, budget)
        for i in range(1 if stop > 0 else 0, stop + 1):
            key = (-kl[i], k, i)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[1], best[2]


def hierarchical_bootstrap(values: np.ndarray, *, replicates: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of per-run values (typically paired differences) with a 95% percentile interval from a bootstrap
    that resamples worlds, then training seeds within each drawn world.

    Shape: values (W worlds, S seeds); NaN marks a missing run (e.g. a KL level a run never reaches), left out.
    The estimate is the mean over worlds of each world's mean over its runs (worlds weigh equally).
    Example: [[1, 3], [5, 7]] -> estimate 4; every replicate is a mean of world means drawn from {1..3, 5..7}.
    """
    values = np.asarray(values, dtype=float)
    keep = [row[~np.isnan(row)] for row in values]
    keep = [row for row in keep if len(row)]
    if not keep:
        return {"estimate": float("nan"), "se": float("nan"), "low": float("nan"), "high": float("nan"),
                "worlds": 0, "runs": 0}
    estimate = float(np.mean([row.mean() for row in keep]))
    rng = np.random.default_rng(seed)
    worlds = len(keep)
    world_draws = rng.integers(0, worlds, (replicates, worlds))  # which world fills each position
    means = np.zeros((replicates, worlds))
    for w, row in enumerate(keep):  # the mean of a seed resample of world w, for every position it may fill
        resampled = row[rng.integers(0, len(row), (replicates, worlds, len(row)))].mean(-1)
        means = np.where(world_draws == w, resampled, means)
    draws = means.mean(-1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"estimate": estimate, "se": float(draws.std(ddof=1)), "low": float(low), "high": float(high),
            "worlds": worlds, "runs": int(sum(len(row) for row in keep))}


def t_quantile(df: int) -> float:
    """Two-sided 95% Student t quantile: the table up to 10 degrees of freedom, then the Cornish-Fisher expansion.

    Example: 4 -> 2.776; 30 -> 2.042.
    """
    if df in T_975:
        return T_975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def world_t_interval(values: np.ndarray) -> dict[str, float]:
    """The same estimate with a t-interval over the world means (W - 1 degrees of freedom): a check on the
    bootstrap, whose percentile interval is too narrow with few worlds.

    Shape: values (W, S), NaN left out. Example: world means 1, 2, 3 -> 2 +- 4.303 * 1 / sqrt(3) = [-0.484, 4.484].
    """
    values = np.asarray(values, dtype=float)
    means = np.array([np.nanmean(row) for row in values if np.any(~np.isnan(row))])
    if len(means) < 2:
        return {"estimate": float(means.mean()) if len(means) else float("nan"), "low": float("nan"),
                "high": float("nan")}
    half = t_quantile(len(means) - 1) * means.std(ddof=1) / math.sqrt(len(means))
    return {"estimate": float(means.mean()), "low": float(means.mean() - half), "high": float(means.mean() + half)}


def reading(low: float, high: float, *, smallest: float = SMALLEST_EFFECT, ahead: str = "HyPO",
            behind: str = "DPO") -> str:
    """The preregistered reading of a 95% interval of a difference `ahead` - `behind` (positive: `ahead` better).

    Example: [0.01, 0.02] -> "HyPO ahead (by less than 0.03)"; [-0.02, 0.01] -> "equivalent within 0.03";
    [-0.05, 0.01] -> "not resolved"; [-0.2, -0.1] -> "DPO ahead".
    """
    if math.isnan(low) or math.isnan(high):
        return "no data"
    if low > 0:
        return f"{ahead} ahead" + (f" (by less than {smallest:g})" if high < smallest else "")
    if high < 0:
        return f"{behind} ahead" + (f" (by less than {smallest:g})" if low > -smallest else "")
    if -smallest < low and high < smallest:
        return f"equivalent within {smallest:g}"
    return "not resolved"


def interpolate_step(steps: Sequence[float], kls: Sequence[float], level: float) -> float:
    """The (linearly interpolated) step at which a KL trajectory first reaches `level`; NaN if it never does.

    Example: steps [0, 32, 64], kls [0, 2, 12], level 10 -> 32 + 32 * 8 / 10 = 57.6.
    """
    from hypo.lab.partial_coverage.analysis import interpolate_at_kl

    value = interpolate_at_kl(list(kls), np.asarray(steps, dtype=float)[:, None], level)
    return float("nan") if value is None else float(value[0])
