"""Hub datasets mapped to the common schema (prompt, reference).

Parquet repositories (TL;DR, GSM8K, MATH) go through `datasets.load_dataset(name, config)`, so a hub id (on a user's
machine) and a local folder in the hub's layout (what the tests and the rehearsal build) take the same code path.
AlpacaFarm is a script repository (`alpaca_farm.py` beside `alpaca_instructions/*.json`), which `datasets` >= 4
refuses to load; its JSON files are read directly, from the local folder or from the repository's snapshot in the
hub cache (`huggingface_hub.snapshot_download`, which also serves them offline once downloaded).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from rlhf.errors import DataError

# The prompt format of both papers for the filtered TL;DR set (Huang et al. 2024's TL;DR setup).
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_COLUMNS = ({"prompt", "completion"}, {"subreddit", "title", "post", "summary"})
ALPACA_COLUMNS = {"instruction", "input", "output"}


def load(name: str, config: str | None = None, split: str | None = None):
    """datasets.load_dataset of a hub id or a local folder. A local folder is read afresh every time: datasets 5.2
    keys its cache of a local folder by the folder's name and data-file patterns, not by the files' contents, so an
    edited (or another) folder of the same name came back as the rows cached from the first one."""
    import datasets  # heavy (~1 s): only the hub sources load it
    local = Path(name).exists()
    try:
        if local:
            with tempfile.TemporaryDirectory(prefix="rlhf-datasets-") as cache:
                return datasets.load_dataset(name, config, split=split, cache_dir=cache, keep_in_memory=True)
        return datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise DataError(f"{name}: {e}") from None
        raise
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot load dataset {name!r}: {e}") from None
    except RuntimeError as e:
        if "scripts are no longer supported" in str(e):
            raise DataError(f"{name} is a script-based dataset repository, which datasets >= 4 cannot load ({e}); "
                            "point data.hub_name at a copy in parquet or JSON, or use a data.source that reads its "
                            "files (alpaca_farm does)") from None
        raise


def repository_files(name: str, patterns: list[str]) -> Path:
    """The folder holding a dataset repository's files: `name` itself when it is a local folder, else the snapshot of
    the hub repository (only the files matching `patterns`) in the hub cache, downloaded once."""
    if Path(name).exists():
        return Path(name)
    from huggingface_hub import snapshot_download  # only for a script-based repository
    try:
        return Path(snapshot_download(name, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline without a cached copy, no such repository, no network: all one message
        raise DataError(f"cannot fetch dataset repository {name!r} ({type(e).__name__}: {e}); "
                        "run `python -m rlhf download --config ...` where the hub is reachable") from None


def tldr_rows(name: str, split: str) -> list[dict]:
    """`trl-lib/tldr` (prompt, completion) or `vwxyzjn/summarize_from_feedback_tldr_3_filtered`
    (subreddit, title, post, summary), recognised by their columns."""
    ds = load(name, None, split)
    columns = set(ds.column_names)
    if TLDR_COLUMNS[0] <= columns:
        return [{"prompt": r["prompt"], "reference": r["completion"].strip()} for r in ds]
    if TLDR_COLUMNS[1] <= columns:
        return [{"prompt": TLDR_PROMPT.format(**{k: r[k] for k in ("subreddit", "title", "post")}),
                 "reference": r["summary"].strip()} for r in ds]
    raise DataError(f"{name} split {split!r}: expected columns {sorted(TLDR_COLUMNS[0])} or "
                    f"{sorted(TLDR_COLUMNS[1])}, found {sorted(columns)}")


ALPACA_CONFIG = "alpaca_instructions"


def alpaca_splits(name: str, config: str | None) -> dict[str, list[dict]]:
    """The JSON files of one AlpacaFarm config (`<config>/<split>.json`: sft, preference, unlabeled, val), by split."""
    config = config or ALPACA_CONFIG
    folder = repository_files(name, [f"{config}/*.json"]) / config
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{name}: no {config}/<split>.json files (the layout of tatsu-lab/alpaca_farm: "
                        f"{config}/sft.json, preference.json, unlabeled.json, val.json)")
    out = {}
    for path in files:
        try:
            out[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a JSON list of rows ({e})") from None
    return out


def alpaca_rows(name: str, config: str | None, tokenizer, max_tokens: int, seed: int, num_test: int):
    """`tatsu-lab/alpaca_farm` `alpaca_instructions`: all splits merged, prompt + response <= max_tokens tokens
    of the policy's tokenizer, then a seeded split into train and the last `num_test` rows as test."""
    rows = []
    for split_name, split in alpaca_splits(name, config).items():
        missing = ALPACA_COLUMNS - set(split[0] if split and isinstance(split[0], dict) else {})
        if missing:
            raise DataError(f"{name} split {split_name!r}: missing column(s) {', '.join(sorted(missing))}")
        for r in split:
            prompt = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
            rows.append({"prompt": prompt, "reference": r["output"].strip()})
    kept = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["reference"])["input_ids"]) <= max_tokens]
    if len(kept) <= num_test:
        raise DataError(f"{name}: {len(kept)} of {len(rows)} examples fit in {max_tokens} tokens; "
                        f"not enough for {num_test} test prompts")
    random.Random(seed).shuffle(kept)
    return kept[:-num_test], kept[-num_test:]
