"""data: prompts with reference responses, train/test (and validation) splits in the common schema (jsonl)."""
from rlhf.data import load_splits_with_validation
from rlhf.io import write_jsonl


def run(cfg, files, args):
    train, test, validation = load_splits_with_validation(cfg)
    out = files.outputs
    write_jsonl(out["train"], train)
    write_jsonl(out["test"], test)
    if "validation" in out:
        write_jsonl(out["validation"], validation)
    print(f"data: {len(train)} train / {len(test)} test / {len(validation)} validation prompts -> "
          f"{out['train'].parent}")
