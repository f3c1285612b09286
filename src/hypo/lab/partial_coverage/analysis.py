"""Pure analysis of `hypo lab partial-coverage`: matched-KL interpolation, the worst case over gold worlds,
and the paired bootstrap over seeds and prompts. NumPy only; every function has a test on known inputs.
"""

from __future__ import annotations

import numpy as np

Z_80_POWER = 0.8416  # one-sided normal quantile for 80% power
Z_95 = 1.959964


def first_crossing(kls: list[float], level: float) -> tuple[int, float] | None:
    """Where a run's KL trajectory (in step order, starting at the reference's 0) first reaches `level`:
    (i, t) with KL = (1 - t) * kls[i] + t * kls[i + 1], or None when it never does.

    Example: kls [0, 1, 3], level 2 -> (1, 0.5); level 1 -> (0, 1.0); level 4 -> None.
    """
    for i in range(len(kls) - 1):
        lo, hi = kls[i], kls[i + 1]
        if lo < level <= hi:
            return i, (level - lo) / (hi - lo)
        if lo == level:
            return i, 0.0
    return None


def interpolate_at_kl(kls: list[float], values: np.ndarray, level: float) -> np.ndarray | None:
    """`values` (one row per checkpoint, any trailing shape) linearly interpolated at the first point where
    the KL trajectory reaches `level`; None when it never does.

    Example: kls [0, 1, 3], values [[0], [2], [6]], level 2 -> [4].
    """
    where = first_crossing(kls, level)
    if where is None:
        return None
    i, t = where
    values = np.asarray(values, dtype=float)
    return (1 - t) * values[i] + t * values[i + 1]


def worst_case(per_world: np.ndarray) -> float:
    """The lowest of the per-world means (worlds on axis 0, anything else averaged).

    Example: [[0.6, 0.8], [0.2, 0.4]] -> min(0.7, 0.3) = 0.3.
    """
    per_world = np.asarray(per_world, dtype=float)
    return float(per_world.reshape(per_world.shape[0], -1).mean(axis=1).min())


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, replicates: int = 2000, seed: int = 0,
                     worst: bool = False) -> dict[str, float]:
    """Difference of means a - b with a 95% percentile interval, resampling seeds and prompts together.

    Shape: a, b (S seeds, P prompts), paired by seed and prompt; with `worst`, (W worlds, S, P) and the
    statistic is worst_case(a) - worst_case(b) (the worst world of each method, on the same resample).
    Each replicate draws S seeds and P prompts with replacement and applies the same draw to a and b.
    Returns the full-sample estimate, the bootstrap standard error and the interval.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"unpaired shapes {a.shape} and {b.shape}")
    if not worst:
        a, b = a[None], b[None]
    _, seeds, prompts = a.shape
    rng = np.random.default_rng(seed)

    def stat(x: np.ndarray, y: np.ndarray) -> float:
        return worst_case(x) - worst_case(y)

    estimate = stat(a, b)
    draws = np.empty(replicates)
    for r in range(replicates):
        s = rng.integers(0, seeds, seeds)
        p = rng.integers(0, prompts, prompts)
        draws[r] = stat(a[:, s][:, :, p], b[:, s][:, :, p])
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"estimate": estimate, "se": float(draws.std(ddof=1)), "low": float(low), "high": float(high),
            "seeds": seeds, "prompts": prompts}


def minimum_detectable_difference(se: float) -> float:
    """The true difference a two-sided 5% test detects with 80% power, given the standard error of its
    estimate: (1.96 + 0.84) * se.

    Example: se 0.02 -> 0.056.
    """
    return (Z_95 + Z_80_POWER) * se
