"""Hub datasets mapped to the common schema (prompt, reference).

Everything goes through `datasets.load_dataset(name, config)`, so a hub id (on a user's machine) and a local
folder in the hub's layout (what the tests build) take the same code path.
"""
from __future__ import annotations

import random

from rlhf.errors import DataError

# The prompt format of both papers for the filtered TL;DR set (PAPERS.md section 1).
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_COLUMNS = ({"prompt", "completion"}, {"subreddit", "title", "post", "summary"})
ALPACA_COLUMNS = {"instruction", "input", "output"}


def load(name: str, config: str | None = None, split: str | None = None):
    import datasets
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise DataError(f"{name}: {e}") from None
        raise
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot load dataset {name!r}: {e}") from None


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


def alpaca_rows(name: str, config: str | None, tokenizer, max_tokens: int, seed: int, num_test: int):
    """`tatsu-lab/alpaca_farm` `alpaca_instructions`: all splits merged, prompt + response <= max_tokens tokens
    of the policy's tokenizer, then a seeded split into train and the last `num_test` rows as test."""
    splits = load(name, config)
    rows = []
    for split_name, ds in splits.items():
        missing = ALPACA_COLUMNS - set(ds.column_names)
        if missing:
            raise DataError(f"{name} split {split_name!r}: missing column(s) {', '.join(sorted(missing))}")
        for r in ds:
            prompt = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
            rows.append({"prompt": prompt, "reference": r["output"].strip()})
    kept = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["reference"])["input_ids"]) <= max_tokens]
    if len(kept) <= num_test:
        raise DataError(f"{name}: {len(kept)} of {len(rows)} examples fit in {max_tokens} tokens; "
                        f"not enough for {num_test} test prompts")
    random.Random(seed).shuffle(kept)
    return kept[:-num_test], kept[-num_test:]
