"""Datasets mapped to one schema: rows with `prompt` and `reference` (plus any extra columns).

A loader returns (train, test). New sources (hub datasets) register here; every downstream stage only
sees the common schema. `load_splits_with_validation` adds data.num_validation rows where a source can make them.
"""
# Function-level imports: this package is imported by the config check and the Snakefile (through rlhf.data.rlvr), so
# each source's loader (torch, transformers, datasets) is imported only where that source is read.
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


def miniature_tokenizer(cfg: dict):
    """The tokenizer the base stage saves for a miniature (the data stage of the RLVR miniature builds the same one
    to apply its chat template: it is a function of the config alone)."""
    if "arithmetic" in cfg["data"]:
        from rlhf.data.arithmetic import ArithmeticSpec, build_chat_tokenizer
        return build_chat_tokenizer(ArithmeticSpec(**cfg["data"]["arithmetic"]).vocabulary())
    from rlhf.data.miniature import MiniatureSpec
    from rlhf.models import build_word_tokenizer
    return build_word_tokenizer(MiniatureSpec.from_config(cfg).vocabulary())


def _rlvr_splits(cfg: dict) -> tuple[list[dict], list[dict]]:
    """RLVR rows (question, solution, reference, prompt through the policy's chat template)."""
    from rlhf.data import rlvr
    data, task, section = cfg["data"], rlvr.rlvr_task(cfg), cfg["rlvr"]
    if data["source"] == "arithmetic":
        from rlhf.data.arithmetic import ArithmeticSpec, generate
        rows = generate(ArithmeticSpec(**data["arithmetic"]), data["num_train"] + data["num_test"], cfg["seed"])
        train, test, tokenizer = rows[: data["num_train"]], rows[data["num_train"]:], miniature_tokenizer(cfg)
    else:
        from rlhf.models import load_tokenizer
        train = rlvr.hub_rows(task, data["hub_name"], data.get("hub_config"), data["train_split"])[: data["num_train"]]
        test = rlvr.hub_rows(task, data["hub_name"], data.get("hub_config"), data["test_split"])[: data["num_test"]]
        tokenizer = load_tokenizer(cfg["model"]["name"], pad_token=cfg["model"]["pad_token"])
    system = section["system_prompt"] if section["system_prompt"] is not None else rlvr.GSM8K_SYSTEM
    split = lambda rows: rlvr.with_prompts(rows, task, tokenizer, one_shot=section["one_shot"], system=system)  # noqa: E731
    return _check(split(train), f"{data['source']} train"), _check(split(test), f"{data['source']} test")


def load_splits_with_validation(cfg: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, validation): load_splits' rows and data.num_validation rows for tuning and early stopping,
    disjoint from the reported test rows. The generated sources make them after train and test from the same stream
    (whose first rows are unchanged by asking for more), in one pass: the miniature's prompts are unique across the
    three splits; arithmetic problems may repeat, as between its train and test. Other sources: a clear error (their
    hub splits are not mapped yet)."""
    data, n = cfg["data"], cfg["data"].get("num_validation", 0)
    if not n:
        return (*load_splits(cfg), [])
    if data["source"] not in ("miniature", "arithmetic"):
        raise DataError(f"data.num_validation: only the miniature and arithmetic sources make validation rows (source "
                        f"{data['source']!r}); set it to 0")
    train, test = load_splits({**cfg, "data": {**data, "num_test": data["num_test"] + n}})
    return train, test[: data["num_test"]], _check(test[data["num_test"]:], f"{data['source']} validation")


def load_splits(cfg: dict) -> tuple[list[dict], list[dict]]:
    data = cfg["data"]
    if "rlvr" in cfg:
        return _rlvr_splits(cfg)
    if data["source"] == "miniature":
        from rlhf.data.miniature import MiniatureSpec, generate_splits
        train, test = generate_splits(MiniatureSpec.from_config(cfg), data["num_train"], data["num_test"], cfg["seed"])
        return _check(train, "miniature train"), _check(test, "miniature test")
    if data["source"] == "tldr":
        from rlhf.data.hub import tldr_rows
        train = tldr_rows(data["hub_name"], data["train_split"])[: data["num_train"]]
        test = tldr_rows(data["hub_name"], data["test_split"])[: data["num_test"]]
        return _check(train, f"{data['hub_name']}:{data['train_split']}"), _check(test, f"{data['hub_name']}:{data['test_split']}")
    if data["source"] == "alpaca_farm":
        from rlhf.data.hub import alpaca_rows
        from rlhf.models import load_tokenizer
        tokenizer = load_tokenizer(cfg["model"]["name"], pad_token=cfg["model"]["pad_token"])
        train, test = alpaca_rows(data["hub_name"], data.get("hub_config"), tokenizer, data["max_tokens"], cfg["seed"],
                                  data["num_test"])
        return _check(train[: data["num_train"]], data["hub_name"]), _check(test, data["hub_name"])
    if data["source"] == "jsonl":
        train = read_jsonl(data["train_file"], required=SCHEMA_COLUMNS)[: data["num_train"]]
        test = read_jsonl(data["test_file"], required=SCHEMA_COLUMNS)[: data["num_test"]]
        return _check(train, data["train_file"]), _check(test, data["test_file"])
    raise DataError(f"unknown data.source {data['source']!r}")
