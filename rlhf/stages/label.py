"""label: the gold's preference for every sampled pair, written as chosen/rejected."""
import numpy as np

from rlhf.errors import RewardError
from rlhf.io import read_jsonl, write_jsonl
from rlhf.rewards.gold import make_gold
from rlhf.stages.common import setup


def run(cfg, files, args):
    device = setup(cfg, args)
    out = files.outputs["labels"]
    pairs = read_jsonl(files.inputs["samples"], required=("prompt", "a", "b"))
    gold = make_gold(cfg, device)
    prompts, a, b = ([p[k] for p in pairs] for k in ("prompt", "a", "b"))
    prefer_a, scores_a, scores_b = gold.label(prompts, a, b, np.random.default_rng(cfg["seed"]))
    undecided = np.isnan(prefer_a)  # unparseable judge answers: such a pair has no label, so it is left out
    if undecided.all():
        raise RewardError(f"label: the gold decided none of the {len(pairs)} pairs (every judge answer unparseable)")
    rows = []
    for i, pair in enumerate(pairs):
        if undecided[i]:
            continue
        first = prefer_a[i] == 1.0
        row = {"prompt": pair["prompt"], "chosen": pair["a"] if first else pair["b"],
               "rejected": pair["b"] if first else pair["a"]}
        if scores_a is not None:
            row["gold_chosen"], row["gold_rejected"] = (scores_a[i], scores_b[i]) if first else (scores_b[i], scores_a[i])
        rows.append(row)
    write_jsonl(out, rows)
    dropped = f"; {int(undecided.sum())} left out, the judge's answer unparseable" if undecided.any() else ""
    print(f"label: {len(rows)} of {len(pairs)} pairs labeled by gold '{cfg['gold']['type']}'{dropped} -> {out}")
