"""The MATH difficulty table of the GR paper (Table 4, App. C.4): accuracy by how hard a question was for the base
model, at chosen checkpoints.

"Group test questions by (type x level), compute each group's base-model accuracy, bin groups into 0-20, 20-40,
40-60, 60-80, >80 %; report per-bin accuracy at steps ..." (GR paper Sec. 5.2, Table 4). A bin's accuracy is the mean
correctness of all its questions (each question weighs the same, whatever its group's size). Bin edges: a group at
exactly 20 % falls in 20-40 (left-closed bins; the last bin includes 100 %).
"""
from __future__ import annotations

import pandas as pd

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LABELS = ("0-20", "20-40", "40-60", "60-80", ">80")


def difficulty_table(base: pd.DataFrame, checkpoints: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """base and each checkpoint: one row per test question with columns question, type, level, correct (bool).
    Returns rows = bins (with their number of groups and questions), columns = checkpoints, values = accuracy."""
    groups = base.groupby(["type", "level"])["correct"].mean().rename("group_accuracy").reset_index()
    cut = pd.cut(groups["group_accuracy"], bins=list(BINS), labels=list(LABELS), right=False, include_lowest=True)
    groups["bin"] = cut.where(groups["group_accuracy"] < 1.0, LABELS[-1])  # 100 %: the last bin
    question_bin = base[["question", "type", "level"]].merge(groups[["type", "level", "bin"]], on=["type", "level"])
    out = pd.DataFrame({"groups": groups.groupby("bin", observed=False).size(),
                        "questions": question_bin.groupby("bin", observed=False).size()})
    for name, frame in checkpoints.items():
        merged = question_bin.merge(frame[["question", "correct"]], on="question", validate="one_to_one")
        out[name] = merged.groupby("bin", observed=False)["correct"].mean()
    return out.reindex(list(LABELS))


def difficulty_by_method(base: pd.DataFrame, runs: dict[tuple[str, int], dict[int, pd.DataFrame]]) -> pd.DataFrame:
    """The table for each method, its accuracies averaged over seeds: rows (method, bin) with the bin's groups and
    questions, columns = evaluation steps, value = mean over the method's seeds of the bin's accuracy.

    `base` defines the bins and should be an evaluation independent of the runs' step-0 one (the report uses the SFT
    policy's own test evaluation): bins chosen on the same samples they are then scored on would show regression to
    the mean (hard bins "improve", easy ones "degrade") even for a policy that never changed."""
    tables = [difficulty_table(base, {step: frame for step, frame in steps.items()}).assign(method=method, seed=seed)
              for (method, seed), steps in runs.items()]
    long = pd.concat(tables).rename_axis("bin").reset_index()
    steps = sorted({step for steps in runs.values() for step in steps})
    out = long.groupby(["method", "bin"], sort=False)[steps].mean()
    counts = long.groupby(["method", "bin"], sort=False)[["groups", "questions"]].first()
    seeds = long.groupby(["method", "bin"], sort=False)["seed"].nunique().rename("seeds")
    return pd.concat([counts, seeds, out], axis=1).reset_index()
