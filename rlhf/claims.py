"""The pre-registered claims (config/claims.yaml): loading, checking, and the verdict rule the file states.

A comparison claim "A vs B" is decided on the per-seed values of its metric: effect = mean(A) - mean(B) with the
two-sided Welch t interval of that difference (scipy.stats.ttest_ind, equal_var=False); a one-sample claim on the
one-sample t interval of the mean. pass: the whole interval on the predicted side of the threshold; fail: the whole
interval on the other side; inconclusive: the interval contains the threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from rlhf.errors import ConfigError

FIELDS = ("id", "paper", "source", "statement", "tasks", "metric", "comparison", "predicted", "threshold")
OPTIONAL = ("added_after_results",)
TASKS = ("miniature", "miniature-ood", "rlvr-miniature", "rlvr-ood")
PREDICTED = ("greater", "less")


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    source: str
    statement: str
    tasks: tuple[str, ...]
    metric: str
    comparison: str
    predicted: str
    threshold: float
    added_after_results: bool = False


def load_claims(path: str | Path) -> list[Claim]:
    """Every claim of the file, checked: one line naming the claim and the field otherwise."""
    path = Path(path)
    rows = (yaml.safe_load(path.read_text()) or {}).get("claims")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path}: expected a non-empty list under `claims:`")
    claims, seen = [], set()
    for i, row in enumerate(rows):
        name = row.get("id", f"#{i}") if isinstance(row, dict) else f"#{i}"
        where = f"{path}: claim {name}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a mapping")
        missing = [f for f in FIELDS if f not in row]
        unknown = sorted(set(row) - set(FIELDS) - set(OPTIONAL))
        if missing or unknown:
            raise ConfigError(f"{where}: " + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                                       unknown and f"unknown {', '.join(unknown)}"])))
        if name in seen:
            raise ConfigError(f"{where}: id used twice")
        seen.add(name)
        bad_tasks = [t for t in row["tasks"] if t not in TASKS]
        if bad_tasks:
            raise ConfigError(f"{where}: tasks: unknown {', '.join(bad_tasks)} (known: {', '.join(TASKS)})")
        if row["predicted"] not in PREDICTED:
            raise ConfigError(f"{where}: predicted must be one of {', '.join(PREDICTED)}, got {row['predicted']!r}")
        if not isinstance(row["threshold"], (int, float)) or isinstance(row["threshold"], bool):
            raise ConfigError(f"{where}: threshold must be a number, got {row['threshold']!r}")
        claims.append(Claim(**{**row, "tasks": tuple(row["tasks"]), "threshold": float(row["threshold"])}))
    return claims


@dataclass(frozen=True)
class Verdict:
    verdict: str        # pass / fail / inconclusive
    effect: float       # mean(A) - mean(B), or mean(A) for a one-sample claim
    low: float          # the 95 % interval of the effect
    high: float
    n_a: int
    n_b: int            # 0 for a one-sample claim


def decide(a, b=None, *, predicted: str, threshold: float, confidence: float = 0.95) -> Verdict:
    """The verdict of config/claims.yaml's rule on per-seed values a (and b for a comparison)."""
    from scipy import stats  # here, not at the top: only the claims report needs it (0.6 s of import)
    if predicted not in PREDICTED:
        raise ValueError(f"predicted must be one of {PREDICTED}, got {predicted!r}")
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if b is None:
        effect, n_b = float(a.mean()) if a.size else math.nan, 0
        ci = stats.ttest_1samp(a, threshold).confidence_interval(confidence) if a.size > 1 else None
    else:
        b = np.asarray(b, dtype=np.float64)
        b = b[np.isfinite(b)]
        effect = float(a.mean() - b.mean()) if a.size and b.size else math.nan
        n_b = int(b.size)
        ci = (stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
              if a.size > 1 and b.size > 1 else None)
    low, high = (float(ci.low), float(ci.high)) if ci is not None else (math.nan, math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        verdict = "inconclusive"   # too few seeds, or no spread to build an interval from
    elif (low > threshold) if predicted == "greater" else (high < threshold):
        verdict = "pass"
    elif (high < threshold) if predicted == "greater" else (low > threshold):
        verdict = "fail"
    else:
        verdict = "inconclusive"
    return Verdict(verdict, effect, low, high, int(a.size), n_b)
