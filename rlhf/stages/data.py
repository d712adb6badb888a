"""data: prompts with reference responses, train/test splits in the common schema (jsonl)."""
from rlhf.data import load_splits
from rlhf.io import write_jsonl


def run(cfg, files, args):
    train, test = load_splits(cfg)
    out = files.outputs
    write_jsonl(out["train"], train)
    write_jsonl(out["test"], test)
    print(f"data: {len(train)} train / {len(test)} test prompts -> {out['train'].parent}")
