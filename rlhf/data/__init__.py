"""Datasets mapped to one schema: rows with `prompt` and `reference` (plus any extra columns).

A loader returns (train, test). New sources (hub datasets) register here; every downstream stage only
sees the common schema.
"""
from __future__ import annotations

from rlhf.errors import DataError
from rlhf.io import read_jsonl

SCHEMA_COLUMNS = ("prompt", "reference")


def _check(rows: list[dict], where: str) -> list[dict]:
    if not rows:
        raise DataError(f"{where}: empty dataset (no rows)")
    for i, row in enumerate(rows):
        for col in SCHEMA_COLUMNS:
            if not isinstance(row.get(col), str) or not row[col].strip():
                raise DataError(f"{where}: row {i} has no non-empty string '{col}'")
    return rows


def load_splits(cfg: dict) -> tuple[list[dict], list[dict]]:
    data = cfg["data"]
    if data["source"] == "miniature":
        from rlhf.data.miniature import MiniatureSpec, generate_splits
        train, test = generate_splits(MiniatureSpec.from_config(cfg), data["num_train"], data["num_test"], cfg["seed"])
        return _check(train, "miniature train"), _check(test, "miniature test")
    if data["source"] == "jsonl":
        train = read_jsonl(data["train_file"], required=SCHEMA_COLUMNS)[: data["num_train"]]
        test = read_jsonl(data["test_file"], required=SCHEMA_COLUMNS)[: data["num_test"]]
        return _check(train, data["train_file"]), _check(test, data["test_file"])
    raise DataError(f"unknown data.source {data['source']!r}")
