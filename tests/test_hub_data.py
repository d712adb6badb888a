"""The paper datasets' loaders on local folders in the real hub repositories' layouts, through the data stage."""
import json

import pandas as pd
import pytest

from rlhf.cli import main
from rlhf.data.hub import TLDR_PROMPT
from tests.conftest import REPO, write_config


def hub_folder(root, splits: dict[str, list[dict]]):
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pd.DataFrame(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def run_data(tmp_path, data: dict, model: dict | None = None, **sections) -> tuple[int, list[dict], list[dict]]:
    cfg = write_config(tmp_path, data=data, model=model or {"name": "unused"}, **sections)
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


def alpaca_folder(root, splits: dict[str, list[dict]]):
    """tatsu-lab/alpaca_farm's layout: the loading script beside alpaca_instructions/<split>.json."""
    from rlhf.rehearsal.hub_fixtures import ALPACA_SCRIPT
    (root / "alpaca_instructions").mkdir(parents=True)
    for split, rows in splits.items():
        (root / "alpaca_instructions" / f"{split}.json").write_text(json.dumps(rows))
    (root / "alpaca_farm.py").write_text(ALPACA_SCRIPT)
    return root


def test_alpaca_farm_merges_splits_and_filters_by_policy_tokens(tmp_path, tiny_lm):
    _, tok = tiny_lm
    tok.save_pretrained(tmp_path / "policy")
    short = {"instruction": "name a car", "input": "", "output": "the car"}
    with_input = {"instruction": "summarize", "input": "alice lost the car", "output": "alice lost car"}
    too_long = {"instruction": " ".join(["word"] * 20), "input": "", "output": "x"}
    hub = alpaca_folder(tmp_path / "alpaca_farm", {"sft": [short] * 4 + [too_long], "preference": [with_input] * 4,
                                                   "val": [short] * 2})
    code, train, test = run_data(tmp_path, {"source": "alpaca_farm", "hub_name": str(hub), "hub_config":
                                            "alpaca_instructions", "max_tokens": 12, "num_train": None, "num_test": 2},
                                 {"name": str(tmp_path / "policy")})
    assert code == 0 and len(train) + len(test) == 10 and len(test) == 2  # 11 rows merged, 1 over 12 tokens
    prompts = {r["prompt"] for r in train + test}
    assert prompts == {"name a car", "summarize\n\nalice lost the car"}


def test_alpaca_farm_script_repository_loads_where_datasets_refuses_it(tmp_path, tiny_lm):
    """tatsu-lab/alpaca_farm ships a loading script, which datasets >= 4 refuses ("Dataset scripts are no longer
    supported") for a hub id and a local copy alike: its JSON files are read instead, from the folder or from the
    repository's snapshot in the hub cache (huggingface_hub.snapshot_download, only that config's files)."""
    import datasets

    from rlhf.data import hub
    from rlhf.errors import DataError
    from rlhf.rehearsal.hub_fixtures import write_hub_dataset
    folder = write_hub_dataset("alpaca_farm", tmp_path / "alpaca_farm", 8)
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        datasets.load_dataset(str(folder), "alpaca_instructions")
    with pytest.raises(DataError, match="is a script-based dataset repository"):
        hub.load(str(folder), "alpaca_instructions")
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(folder)
    import huggingface_hub
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    try:
        splits = hub.alpaca_splits("tatsu-lab/alpaca_farm", "alpaca_instructions")
    finally:
        monkeypatch.undo()
    assert asked == [("tatsu-lab/alpaca_farm", {"repo_type": "dataset", "allow_patterns": ["alpaca_instructions/*.json"]})]
    assert sorted(splits) == ["preference", "sft", "unlabeled", "val"] and all(len(v) == 8 for v in splits.values())
    assert set(splits["sft"][0]) == {"instruction", "input", "output"}


@pytest.mark.parametrize("kind", ["tldr", "alpaca_farm", "gsm8k", "math"])
def test_every_paper_dataset_in_its_real_layout_through_the_data_stage(tmp_path, kind):
    """The data stage of the paper configs' sources on folders in the real repositories' layouts (README configs,
    parquet per split and config, AlpacaFarm's script + JSON), with a tokenizer of the policy's class."""
    from rlhf.rehearsal.hub_fixtures import write_hub_dataset
    from rlhf.rehearsal.standins import build_tokenizer
    from rlhf.config import load_config
    folder = write_hub_dataset(kind, tmp_path / kind, 12)
    paper = {"tldr": "gr-tldr-pythia-1b", "alpaca_farm": "gr-alpaca-qwen2.5-0.5b", "gsm8k": "gr-gsm8k-rule-qwen2.5-0.5b",
             "math": "gr-math-qwen2.5-1.5b"}[kind]
    cfg = load_config(REPO / "config" / "paper" / f"{paper}.yaml")
    family = {"tldr": "pythia", "alpaca_farm": "qwen"}.get(kind, "qwen-instruct")
    (tmp_path / "tok").mkdir()
    build_tokenizer(family, ["a few words to learn merges from, TL;DR: <answer> 12"] * 20, tmp_path / "tok")
    data = {**cfg["data"], "hub_name": str(folder), **({"num_test": 6} if cfg["data"]["num_test"] else {})}
    extra = {"rlvr": cfg["rlvr"], "methods": {"noreg": {}}} if "rlvr" in cfg else {}
    code, train, test = run_data(tmp_path, data, {"name": str(tmp_path / "tok"), "pad_token": "<|padding|>"}, **extra)
    assert code == 0 and train and test
    assert all(r["prompt"].strip() and r["reference"].strip() for r in train + test)
    if kind == "math":
        assert {"level", "type", "solution"} <= set(test[0])


def test_alpaca_farm_needs_the_policy_tokenizer(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"source": "alpaca_farm", "hub_name": "x"}, model={"build": {}})
    assert main(["data", "--config", str(cfg)]) == 2
    assert "needs model.name" in capsys.readouterr().err


def test_a_local_folder_edited_in_place_is_read_afresh(tmp_path):
    """datasets caches a local folder by its name, not its contents: rewritten in place (or another folder of the same
    name), the loader must still see what is there now."""
    import shutil

    from rlhf.data.hub import tldr_rows
    from rlhf.rehearsal.hub_fixtures import write_hub_dataset
    for rows in (5, 9):
        shutil.rmtree(tmp_path / "tldr", ignore_errors=True)
        write_hub_dataset("tldr", tmp_path / "tldr", rows)
        assert len(tldr_rows(str(tmp_path / "tldr"), "train")) == rows


def test_download_fetches_the_models_and_runs_the_data_loaders_once(tmp_path, monkeypatch, capsys):
    """`python -m rlhf download`: the experiment's hub models (policy, UWO members, gold RM) and its dataset, through
    the data stage's own loaders, into the hub cache; jobs then run with HF_HUB_OFFLINE=1."""
    import huggingface_hub

    from rlhf.config import load_config
    from rlhf.rehearsal.hub_fixtures import write_hub_dataset
    from rlhf.rehearsal.standins import build_tokenizer
    from rlhf.stages.download import hub_models
    assert hub_models(load_config(REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml")) == [
        "EleutherAI/pythia-1b-deduped", "EleutherAI/pythia-410m-deduped", "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"]
    folder = write_hub_dataset("alpaca_farm", tmp_path / "alpaca_farm", 8)
    (tmp_path / "tok").mkdir()
    build_tokenizer("qwen", ["words to merge"] * 10, tmp_path / "tok")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append((repo, kw)) or str(folder))
    cfg = write_config(tmp_path, data={"source": "alpaca_farm", "hub_name": "tatsu-lab/alpaca_farm", "num_test": 4},
                       model={"name": str(tmp_path / "tok")}, gold={"type": "openai"})
    assert main(["download", "--config", str(cfg)]) == 0
    assert asked == [("tatsu-lab/alpaca_farm", {"repo_type": "dataset", "allow_patterns": ["alpaca_instructions/*.json"]})]
    out = capsys.readouterr().out
    assert "download: dataset tatsu-lab/alpaca_farm: 28 train / 4 test rows cached" in out and "HF_HUB_OFFLINE=1" in out
