"""Means, standard errors and intervals, in plain Python.

Uncertainty is taken across prompts in the evaluations (samples of one prompt are not independent).
"""

from __future__ import annotations

import math

Z_95 = 1.959964


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator); nan where undefined (n < 2).

    Example: [1, 2, 3] -> mean 2, sd 1.
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n)); se is nan for n < 2.

    Example: [1, 2, 3] -> mean 2, sd 1, se 1 / sqrt(3) = 0.57735.
    """
    mean, sd = mean_and_sd(values)
    return mean, sd / math.sqrt(len(values)) if values else math.nan


def win_rate_interval(per_prompt_wins: list[float]) -> tuple[float, float, float]:
    """Win rate and its 95% normal interval across prompts, clipped to [0, 1]."""
    mean, se = mean_and_se(per_prompt_wins)
    if math.isnan(se):
        return mean, math.nan, math.nan
    return mean, max(0.0, mean - Z_95 * se), min(1.0, mean + Z_95 * se)
