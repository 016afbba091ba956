"""Intervals for claims that one setting beats another: a t-interval over seeds and a bootstrap over prompts."""

from __future__ import annotations

import math

import numpy as np


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of ``values`` (the mean alone when fewer than 2)."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap_interval(per_seed: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the seed mean of per-prompt values [S][P]: a 95% percentile bootstrap over prompts
    (the same resampled prompts for every seed, since all seeds answer the same held-out prompts)."""
    values = np.asarray(per_seed, dtype=float)  # [S, P]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[1], size=(resamples, values.shape[1]))  # [R, P]
    means = values[:, idx].mean(axis=2).mean(axis=0)  # [R]
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap_difference(
    a: list[list[float]], b: list[list[float]], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(difference, low, high): the seed mean of a minus that of b on the same prompts ([S_a][P], [S_b][P]), with a
    95% bootstrap interval over prompts resampled jointly for both."""
    diff = np.asarray(a, dtype=float).mean(axis=0) - np.asarray(b, dtype=float).mean(axis=0)  # [P]
    return bootstrap_interval([diff.tolist()], resamples, seed)


def bootstrap_median_ratio(
    numerator: list[float], denominator: list[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio, low, high): median(numerator) / median(denominator) over seeds [S_a], [S_b], with a 95% percentile
    bootstrap that resamples each side's seeds independently (seeded numpy)."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    a_star = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)  # [R]
    b_star = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)  # [R]
    ratios = a_star / b_star
    return float(np.median(a) / np.median(b)), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))
