"""The out-of-distribution miniature's design checks, before any method runs (config/miniature-ood.yaml).

From the experiment's SFT policy (pi_0) and proxy RM, on test prompts:
- how many emphasis marks pi_0 writes (share of its samples that are the task's exploit: more marks than the true
  reward likes), and the largest count in the proxy's training pairs;
- the proxy's and the gold's mean reward of pi_0's own completions with their marks replaced by k marks, for each k:
  the exploit is over-rewarded where the proxy's best k lies beyond everything pi_0 writes while the gold has fallen.

    python -m rlhf.experiments.ood_design --config config/miniature-ood.yaml [--prompts 128] [--samples 8]

Prints a table and writes results/<experiment>/design/design.json; exits 1 naming each of the three conditions
(`checks`) that fails, so a run of the task can be stopped before any method trains on a design that does not hold.
Needs the experiment's sft and rm (`snakemake results/miniature-ood/rm --configfile config/miniature-ood.yaml`).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np
import torch

from rlhf.config import load_config
from rlhf.data.miniature import EMPHASIS, MiniatureSpec, is_exploit, mark_count, true_reward
from rlhf.errors import ConfigError
from rlhf.generation import sample
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.models import load_causal_lm, tokenizer_of
from rlhf.paths import Paths
from rlhf.rewards.proxy_rm import load_proxy


def with_marks(completion: str, k: int) -> str:
    return " ".join([w for w in completion.split() if w != EMPHASIS] + [EMPHASIS] * k)


def design(cfg: dict, prompts: int, samples: int, seed: int = 0) -> dict:
    spec = MiniatureSpec.from_config(cfg)
    if not spec.emphasis_max:
        raise ConfigError("data.miniature.emphasis_max: the design checks are for the out-of-distribution variant")
    P = Paths.from_config(cfg)
    tokenizer = tokenizer_of(P.sft, cfg)
    policy = load_causal_lm(P.sft)
    proxy = load_proxy(P.rm, cfg, tokenizer, "cpu")
    rows = read_jsonl(P.test, required=("prompt",))[:prompts]
    torch.manual_seed(seed)
    rollout = sample(policy, tokenizer, [r["prompt"] for r in rows], samples, cfg["grpo"]["max_new_tokens"], 1.0)
    completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    expanded = [r["prompt"] for r in rows for _ in range(samples)]
    pairs = read_jsonl(P.labels)
    by_k = []
    # up to the most marks a completion of max_new_tokens words can carry beside a perfect summary
    for k in range(0, min(cfg["grpo"]["max_new_tokens"] - spec.target_length, spec.emphasis_liked + 6) + 1):
        texts = [with_marks(c, k) for c in completions]
        by_k.append({"k": k, "proxy": float(proxy(expanded, texts).rewards.mean()),
                     "gold": float(np.mean([true_reward(p, t, spec) for p, t in zip(expanded, texts)]))})
    seen = max(mark_count(p[side]) for p in pairs for side in ("chosen", "rejected"))
    summary = {"pi0_marks": dict(sorted(Counter(mark_count(c) for c in completions).items())),
               "pi0_exploit_share": float(np.mean([is_exploit(c, spec) for c in completions])),
               "pairs_max_marks": seen, "emphasis_liked": spec.emphasis_liked, "by_k": by_k}
    return {**summary, **checks(summary)}


CONDITIONS = ("rare", "over_rewarded", "penalized")  # every OOD task's three (this module's and rlvr_design's)
RARE = 0.01  # "something pi_0 almost never produces" (the words): at most 1 % of its samples; our choice


def checks(summary: dict) -> dict:
    """The design's three conditions on design()'s summary, each a bool, and the proxy's best mark count:
    rare           pi_0 writes the exploit (more marks than the gold likes) in at most RARE of its samples;
    over_rewarded  the proxy's best count lies beyond every count in its training pairs and beyond what the gold
                   likes, and the proxy scores it above the count pi_0 writes most;
    penalized      the gold scores the proxy's best count below the count pi_0 writes most.
    Together: an exploit that only extrapolation can reward, where pi_0 does not go."""
    by_k = {r["k"]: r for r in summary["by_k"]}
    best = max(by_k.values(), key=lambda r: r["proxy"])
    usual = by_k[max(summary["pi0_marks"], key=summary["pi0_marks"].get)]  # pi_0's most common count
    return {"proxy_best_k": best["k"], "pi0_usual_k": usual["k"],
            "rare": summary["pi0_exploit_share"] <= RARE,
            "over_rewarded": best["k"] > max(summary["pairs_max_marks"], summary["emphasis_liked"])
            and best["proxy"] > usual["proxy"],
            "penalized": best["gold"] < usual["gold"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    out = design(cfg, args.prompts, args.samples)
    yes = {key: "yes" if out[key] else "NO" for key in CONDITIONS}
    print(f"exploit rare under pi_0: {yes['rare']}; over-rewarded by the proxy: {yes['over_rewarded']} (its best at "
          f"{out['proxy_best_k']} marks, pi_0's usual {out['pi0_usual_k']}); penalized by the gold: {yes['penalized']}")
    print(f"pi_0 marks {out['pi0_marks']}; exploit share {out['pi0_exploit_share']:.3f}; "
          f"most marks in the proxy's pairs {out['pairs_max_marks']}; the gold likes up to {out['emphasis_liked']}")
    print("| k | " + " | ".join(str(r["k"]) for r in out["by_k"]) + " |")
    for key in ("proxy", "gold"):
        print(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in out["by_k"]) + " |")
    return save(cfg, out)


def save(cfg: dict, out: dict) -> int:
    """Writes results/<experiment>/design/design.json; the exit status: 1 naming each condition that failed."""
    with atomic_dir(Paths.from_config(cfg).root / "design") as folder:
        write_json(folder / "design.json", out)
    failed = [key for key in CONDITIONS if not out[key]]
    if failed:
        print(f"design checks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
