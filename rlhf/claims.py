"""The pre-registered claims (config/claims.yaml): loading, checking, and the verdict rule the file states.

A comparison claim "A vs B" is decided on the per-seed values of its metric: effect = mean(A) - mean(B) with the
two-sided Welch t interval of that difference (scipy.stats.ttest_ind, equal_var=False); a one-sample claim on the
one-sample t interval of the mean. pass: the whole interval on the predicted side of the threshold; fail: the whole
interval on the other side; inconclusive: the interval contains the threshold.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from rlhf.config import load_config, sweep_points
from rlhf.data.rlvr import rlvr_task
from rlhf.errors import ConfigError, DataError
from rlhf.io import read_json, read_jsonl
from rlhf.paths import Paths

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
        try:
            sides(row["comparison"])
        except ValueError as e:
            raise ConfigError(f"{where}: comparison: {e}") from None
        claims.append(Claim(**{**row, "tasks": tuple(row["tasks"]), "threshold": float(row["threshold"])}))
    return claims


# A side of a comparison: a method of the task's config, optionally at another value of one setting (an extra run,
# "kl@kl_beta=0.01"), or a group of completions of a mechanism claim ("exploit", "other").
SIDE = re.compile(r"[A-Za-z][\w.-]*(@[A-Za-z_][\w.]*=[\w.+-]+)?")


def sides(comparison: str) -> tuple[str, str | None]:
    """'A - B' -> (A, B): the effect is mean(A) - mean(B); 'A' -> (A, None): a one-sample claim on A's values."""
    parts = [p.strip() for p in comparison.split(" - ")]
    if len(parts) > 2 or not all(SIDE.fullmatch(p) for p in parts):
        raise ValueError(f"expected 'A' or 'A - B' (a method, method@setting=value, exploit or other), got "
                         f"{comparison!r}")
    return parts[0], parts[1] if len(parts) == 2 else None


def judge(claim: Claim, values: dict[str, list[float]]) -> Verdict:
    """A claim's verdict from its metric's per-seed values by side (values[side]: one value per seed, or per
    completion group for a mechanism claim). A side without values is an error naming the claim and the side."""
    a, b = sides(claim.comparison)
    missing = [side for side in (a, b) if side is not None and side not in values]
    if missing:
        raise KeyError(f"claim {claim.id}: no values of {claim.metric} for {', '.join(missing)}")
    return decide(values[a], values[b] if b else None, predicted=claim.predicted, threshold=claim.threshold)


def verdict_table(rows: list[tuple[Claim, str, Verdict]]) -> str:
    """The claims table README shows: one row per (claim, task), whatever the verdict, with the number of claims
    tested (for a reader who wants a multiple-comparison correction)."""
    lines = [f"{len(rows)} claim-task pairs tested, 95 % intervals, no correction for multiple comparisons.", "",
             "| claim | paper | task | comparison | seeds | effect | 95 % interval | predicted | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for claim, task, v in rows:
        seeds = f"{v.n_a}" + (f" vs {v.n_b}" if v.n_b else "")
        interval = "-" if math.isnan(v.low) else f"[{v.low:+.3f}, {v.high:+.3f}]"
        sign = ">" if claim.predicted == "greater" else "<"
        lines.append(f"| {claim.id} | {claim.paper} | {task} | {claim.comparison} | {seeds} | {v.effect:+.3f} | "
                     f"{interval} | {sign} {claim.threshold:g} | **{v.verdict}** |")
    return "\n".join(lines) + "\n"


def verdict_table_by_claim(rows: list[tuple[Claim, str, Verdict]]) -> str:
    """The same verdicts with one row per claim and one column per task (effect, 95 % interval, verdict, seeds): the
    tasks side by side, in the order first given."""
    tasks = list(dict.fromkeys(task for _, task, _ in rows))
    by = {(claim.id, task): v for claim, task, v in rows}
    claims = list({claim.id: claim for claim, _, _ in rows}.values())
    lines = [f"{len(rows)} claim-task pairs tested, 95 % intervals, no correction for multiple comparisons.", "",
             "| claim | paper | comparison | predicted | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for claim in claims:
        cells = []
        for task in tasks:
            v = by.get((claim.id, task))
            if v is None:
                cells.append("-")
                continue
            interval = "" if math.isnan(v.low) else f" [{v.low:+.3f}, {v.high:+.3f}]"
            seeds = f"{v.n_a}" + (f" vs {v.n_b}" if v.n_b else "")
            cells.append(f"{v.effect:+.3f}{interval} **{v.verdict}** ({seeds})")
        sign = ">" if claim.predicted == "greater" else "<"
        lines.append(f"| {claim.id} | {claim.paper} | {claim.comparison} | {sign} {claim.threshold:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


# --- a run's value of a claim's metric (one per seed), read from the run's artifacts ----------------------------------

def _final_eval(key):
    return lambda P, method, seed: float(read_json(P.evaluation(method, seed) / "metrics.json")[key])


def _rows_with(P, method, seed, key, hint: str = "") -> list[dict]:
    """The GRPO run's metrics-log rows that carry `key`, in step order (an error naming the file where none does)."""
    rows = sorted((r for r in read_jsonl(P.grpo_metrics(method, seed)) if key in r), key=lambda r: r["step"])
    if not rows:
        raise KeyError(f"{P.grpo_metrics(method, seed)}: no {key}{hint}")
    return rows


def _logged(key, how, hint: str = ""):
    """From the GRPO run's metrics log: `how` of the values of `key` over the rows that carry it, in step order."""
    return lambda P, method, seed: float(how([r[key] for r in _rows_with(P, method, seed, key, hint)]))


def _drop_from_peak(P, method, seed):
    """The periodic held-out win rate at the step where the validation win rate peaked (the earliest of ties, as
    early stopping selects) minus the same held-out win rate at the last step: how far the run fell from the best
    checkpoint a validation split would have kept. Needs data.num_validation."""
    from rlhf.results import select_checkpoint  # the tables' early-stopping rule, one definition
    # the validation win rate is logged in the same evaluation rows as the held-out one
    rows = _rows_with(P, method, seed, "eval/validation_win_rate", " (set data.num_validation)")
    peak = select_checkpoint([r["step"] for r in rows], [r["eval/validation_win_rate"] for r in rows])
    return float(next(r["eval/win_rate"] for r in rows if r["step"] == peak) - rows[-1]["eval/win_rate"])


RUN_METRICS = {
    "win_rate": _final_eval("win_rate"),                   # the evaluate stage's gold win rate on the test prompts
    "accuracy": _final_eval("accuracy"),                   # RLVR: its rule-checked accuracy on the test problems
    "proxy_reward_gain": _logged("eval/proxy_reward", lambda v: v[-1] - v[0]),
    "accuracy_change": _logged("eval/accuracy", lambda v: v[-1] - v[0]),
    "onpolicy_rm_accuracy": _logged("onpolicy/rm_accuracy", lambda v: v[-1]),
    "mean_onpolicy_rm_accuracy": _logged("onpolicy/rm_accuracy", np.mean),
    "drop_from_peak": _drop_from_peak,
}
# The mechanism metrics: the mechanisms stage's summary (each signal on the diagnosed method's completions,
# rlhf/stages/mechanisms.py), per seed; a side is a group of completions (exploit, other) or, for a one-sample claim,
# the method whose signal it is.
def per_seed(summary: dict, key: str) -> list[float]:
    """One value per seed of a mechanisms summary's metric; NaN where a seed has none (no completion on that side:
    absent, or null as the JSON writer stores NaN)."""
    return [math.nan if seed.get(key) is None else float(seed[key]) for seed in summary["seeds"].values()]


MECHANISM_METRICS = {
    "rho_negative_fraction": {"exploit": "signcert/rho_negative/exploit", "other": "signcert/rho_negative/other"},
    "uwo_member_std": {"exploit": "uwo/member_std/exploit", "other": "uwo/member_std/other"},
    "advpo_uncertainty": {"exploit": "advpo/uncertainty/exploit", "other": "advpo/uncertainty/other"},
    "bspo_exploit_share": {"bspo": "bspo/exploit_share"},
}


def method_of(cfg: dict, side: str) -> str:
    """The config's method a side names: 'kl' itself, or for 'kl@kl_beta=0.01' the method whose settings are kl's with
    kl_beta 0.01 (an extra run of the task's config, whatever its name)."""
    name, _, setting = side.partition("@")
    methods = cfg["methods"]
    if name not in methods:
        raise KeyError(f"{side}: no method {name!r} in the config (has: {', '.join(methods)})")
    if not setting:
        return name
    field, value = setting.split("=")
    want = {**methods[name], field: yaml.safe_load(value)}
    found = [m for m, overrides in methods.items() if overrides == want]
    if not found:
        raise KeyError(f"{side}: no method of the config has {name}'s settings with {field}={value} (add it, e.g. "
                       f"{name}-{field}{value}: {want})")
    return found[0]


def claim_values(cfg: dict, claim: Claim) -> dict[str, list[float]]:
    """Each side's per-seed values of the claim's metric on the task's config (cfg: its loaded config; results where
    it says). A run that is missing is an error naming its file."""
    if claim.metric in MECHANISM_METRICS:
        summary_file = Paths.from_config(cfg).mechanisms / "summary.json"
        if not summary_file.is_file():
            raise KeyError(f"claim {claim.id}: {summary_file} is missing (the mechanisms stage: mechanisms.method)")
        keys = MECHANISM_METRICS[claim.metric]
        summary = read_json(summary_file)
        unknown = [side for side in sides(claim.comparison) if side is not None and side not in keys]
        if unknown:
            raise KeyError(f"claim {claim.id}: {claim.metric} has no side {unknown[0]!r} (have: {', '.join(keys)})")
        return {side: per_seed(summary, keys[side]) for side in sides(claim.comparison) if side is not None}
    if claim.metric not in RUN_METRICS:
        raise KeyError(f"claim {claim.id}: {claim.metric} is not read from a run's artifacts (have: "
                       f"{', '.join([*RUN_METRICS, *MECHANISM_METRICS])})")
    P, read = Paths.from_config(cfg), RUN_METRICS[claim.metric]
    return {side: [read(P, method_of(cfg, side), seed) for seed in cfg["seeds"]]
            for side in sides(claim.comparison) if side is not None}


# --- tuning: config/claims.yaml's protocol (a 4-value grid per method, tuning seeds, selection on validation) ---------

# What tuning selects on, from the run's last evaluation on the data.num_validation prompts: the win rate (RLHF), or
# on an RLVR task the rule-checked accuracy (the protocol's "gold" there: the rule checker, not the hackable judge).
final_validation_win_rate = _logged("eval/validation_win_rate", lambda v: v[-1], " (set data.num_validation)")
final_validation_accuracy = _logged("eval/validation_accuracy", lambda v: v[-1], " (set data.num_validation)")


def final_validation_score(cfg: dict):
    return final_validation_accuracy if rlvr_task(cfg) else final_validation_win_rate


def tuning_runs(cfg: dict) -> list[Path]:
    """The files a tuning config's runs write: every sweep point's GRPO metrics, for each of its (tuning) seeds."""
    P = Paths.from_config(cfg)
    return [P.grpo_metrics(m, s) for points in sweep_points(cfg).values() for m in points for s in cfg["seeds"]]


def tune(cfg: dict) -> dict[str, dict]:
    """Each sweep's points with their per-seed final validation scores (final_validation_score) and mean, and the
    selected point: the highest mean, the earliest in grid order on a tie (the grids are written smallest first)."""
    P, out, score = Paths.from_config(cfg), {}, final_validation_score(cfg)
    for name, points in sweep_points(cfg).items():
        rows = {m: [score(P, m, s) for s in cfg["seeds"]] for m in points}
        means = {m: float(np.mean(v)) for m, v in rows.items()}
        best = max(means.values())
        out[name] = {"points": {m: {"settings": points[m], "validation": rows[m], "mean": means[m]} for m in points},
                     "selected": next(m for m in points if means[m] == best)}
    return out


def tuning_table(result: dict[str, dict], seeds: list[int]) -> str:
    lines = [f"| sweep | point | validation score, seeds {', '.join(map(str, seeds))} | mean | selected |",
             "|---|---|---|---|---|"]
    for name, sweep in result.items():
        for m, p in sweep["points"].items():
            lines.append(f"| {name} | {m} | {' / '.join(f'{v:.3f}' for v in p['validation'])} | {p['mean']:.3f} | "
                         f"{'**yes**' if m == sweep['selected'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.claims", description="config/claims.yaml's protocol: the tuning "
                                "runs' targets and selection, and the claims' verdicts.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("targets", help="the tuning config's GRPO runs, as Snakemake targets")
    t.add_argument("config")
    t = sub.add_parser("tune", help="each sweep's validation win rates and selected point (markdown; --json)")
    t.add_argument("config")
    t.add_argument("--json", action="store_true")
    v = sub.add_parser("verdicts", help="the claims' verdicts on the tasks given (markdown)")
    v.add_argument("tasks", nargs="+", metavar="TASK=CONFIG", help=f"a task ({', '.join(TASKS)}) and its config")
    v.add_argument("--claims", default=str(Path(__file__).resolve().parents[1] / "config" / "claims.yaml"))
    v.add_argument("--by-claim", action="store_true", help="one row per claim, a column per task")
    v.add_argument("--results-dir", help="where the runs are (the configs' results_dir otherwise): a repeat made with "
                   "snakemake --config results_dir=DIR")
    args = p.parse_args(argv)
    if args.command == "targets":
        print(" ".join(str(f) for f in tuning_runs(load_config(args.config))))
    elif args.command == "tune":
        cfg = load_config(args.config)
        result = tune(cfg)
        print(json.dumps(result, indent=1) if args.json else tuning_table(result, cfg["seeds"]), end="")
    else:
        rows, untested = [], []
        for item in args.tasks:
            task, _, config = item.partition("=")
            if task not in TASKS or not config:
                p.error(f"{item}: expected TASK=CONFIG with TASK one of {', '.join(TASKS)}")
            cfg = load_config(config, [f"results_dir={args.results_dir}"] if args.results_dir else [])
            for claim in load_claims(args.claims):
                if task in claim.tasks:
                    try:
                        rows.append((claim, task, judge(claim, claim_values(cfg, claim))))
                    except (KeyError, DataError) as e:  # a run or summary the task has not made
                        untested.append(f"- {claim.id} on {task}: not tested ({e.args[0]})")
        table = verdict_table_by_claim(rows) if args.by_claim else verdict_table(rows)
        print(table + ("\n" + "\n".join(untested) + "\n" if untested else ""), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
