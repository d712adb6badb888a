"""Confidence intervals used in evaluation and the report."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def preference_metrics(margin) -> tuple[float, float]:
    """Accuracy and Bradley-Terry loss -log sigmoid(m) of reward margins m = r(preferred) - r(other)."""
    m = np.asarray(margin, dtype=np.float64)
    return float(np.mean(m > 0)), float(np.mean(np.logaddexp(0.0, -m)))


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t confidence interval (over seeds); half-width NaN for a single value."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    from scipy import stats  # here, not at the top: 0.6 s of import in every stage process that never needs it
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def mean_ci_text(mean, half) -> str:
    """'0.326 ± 0.234' (3 decimals), the mean alone where the half-width is NaN, '–' where the mean is missing."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if half is None or math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def winrate_ci(outcomes, confidence: float = 0.95) -> tuple[float, float, float]:
    """Win rate and its normal-approximation interval over per-prompt outcomes in {0, 0.5, 1} (ties count half).

    With ties the outcomes are not Bernoulli, so the interval uses their sample variance; clipped to [0, 1].
    """
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        raise ValueError("win rate of zero outcomes")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    m = float(x.mean())
    return m, max(0.0, m - half), min(1.0, m + half)


def spread(values: list[float]) -> dict:
    """A ratio over independent repeats: median, min, max and the values themselves."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "values": [float(v) for v in values]}
