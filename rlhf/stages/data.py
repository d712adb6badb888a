"""data: prompts with reference responses, train/test splits in the common schema (jsonl)."""
from rlhf.data import load_splits
from rlhf.io import write_jsonl
from rlhf.paths import Paths


def run(cfg, args):
    train, test = load_splits(cfg)
    P = Paths.from_config(cfg)
    write_jsonl(P.train, train)
    write_jsonl(P.test, test)
    print(f"data: {len(train)} train / {len(test)} test prompts -> {P.data}")
