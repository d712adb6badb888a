"""TL;DR and AlpacaFarm loaders on local folders in the hub's parquet layout, through the data stage."""
import json

import pandas as pd

from rlhf.cli import main
from rlhf.data.hub import TLDR_PROMPT
from tests.conftest import write_config


def hub_folder(root, splits: dict[str, list[dict]]):
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pd.DataFrame(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def run_data(tmp_path, data: dict, model: dict | None = None) -> tuple[int, list[dict], list[dict]]:
    cfg = write_config(tmp_path, data=data, model=model or {"name": "unused"})
    code = main(["data", "--config", str(cfg)])
    out = tmp_path / "results" / "micro" / "data"
    read = lambda f: [json.loads(line) for line in (out / f).read_text().splitlines()] if (out / f).exists() else []  # noqa: E731
    return code, read("train.jsonl"), read("test.jsonl")


def test_trl_tldr_format(tmp_path):
    hub = hub_folder(tmp_path / "tldr", {
        "train": [{"prompt": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "completion": " short summary"}] * 3,
        "validation": [{"prompt": "SUBREDDIT: r/b\n\nTITLE: u\n\nPOST: q\n\nTL;DR:", "completion": " other"}] * 2})
    code, train, test = run_data(tmp_path, {"source": "tldr", "hub_name": str(hub), "num_train": 2, "num_test": None})
    assert code == 0 and len(train) == 2 and len(test) == 2
    assert train[0] == {"prompt": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "reference": "short summary"}


def test_filtered_tldr_format_gets_the_papers_prompt(tmp_path):
    row = {"subreddit": "relationships", "title": "A title", "post": "The post.", "summary": " The summary."}
    hub = hub_folder(tmp_path / "tldr3", {"train": [row], "validation": [row]})
    code, train, _ = run_data(tmp_path, {"source": "tldr", "hub_name": str(hub)})
    assert code == 0
    assert train[0]["prompt"] == "SUBREDDIT: r/relationships\n\nTITLE: A title\n\nPOST: The post.\n\nTL;DR:"
    assert train[0]["prompt"] == TLDR_PROMPT.format(subreddit="relationships", title="A title", post="The post.")
    assert train[0]["reference"] == "The summary."


def test_missing_column_and_split_are_clear_errors(tmp_path, capsys):
    hub = hub_folder(tmp_path / "bad", {"train": [{"prompt": "p", "answer": "a"}], "validation": [{"prompt": "p", "answer": "a"}]})
    assert run_data(tmp_path, {"source": "tldr", "hub_name": str(hub)})[0] == 2
    err = capsys.readouterr().err
    assert "expected columns ['completion', 'prompt'] or" in err and "found ['answer', 'prompt']" in err
    hub2 = hub_folder(tmp_path / "nosplit", {"train": [{"prompt": "p", "completion": "c"}]})
    assert run_data(tmp_path, {"source": "tldr", "hub_name": str(hub2)})[0] == 2
    assert 'Unknown split "validation"' in capsys.readouterr().err
    assert not (tmp_path / "results" / "micro" / "data" / "train.jsonl").exists()


def test_alpaca_farm_merges_splits_and_filters_by_policy_tokens(tmp_path, tiny_lm):
    _, tok = tiny_lm
    tok.save_pretrained(tmp_path / "policy")
    short = {"instruction": "name a car", "input": "", "output": "the car"}
    with_input = {"instruction": "summarize", "input": "alice lost the car", "output": "alice lost car"}
    too_long = {"instruction": " ".join(["word"] * 20), "input": "", "output": "x"}
    hub = hub_folder(tmp_path / "alpaca", {"sft": [short] * 4 + [too_long], "preference": [with_input] * 4, "val": [short] * 2})
    code, train, test = run_data(tmp_path, {"source": "alpaca_farm", "hub_name": str(hub), "max_tokens": 12,
                                            "num_train": None, "num_test": 2}, {"name": str(tmp_path / "policy")})
    assert code == 0 and len(train) + len(test) == 10 and len(test) == 2  # 11 rows merged, 1 over 12 tokens
    prompts = {r["prompt"] for r in train + test}
    assert prompts == {"name a car", "summarize\n\nalice lost the car"}


def test_alpaca_farm_needs_the_policy_tokenizer(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"source": "alpaca_farm", "hub_name": "x"}, model={"build": {}})
    assert main(["data", "--config", str(cfg)]) == 2
    assert "needs model.name" in capsys.readouterr().err
