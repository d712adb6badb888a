"""The MATH difficulty table of the GR paper (Table 4, App. C.4): accuracy by how hard a question was for the base
model, at chosen checkpoints.

"Group test questions by (type x level), compute each group's base-model accuracy, bin groups into 0-20, 20-40,
40-60, 60-80, >80 %; report per-bin accuracy at steps ..." (PAPERS.md §8). A bin's accuracy is the mean correctness
of all its questions (each question weighs the same, whatever its group's size). Bin edges: a group at exactly 20 %
falls in 20-40 (left-closed bins; the last bin includes 100 %).
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
