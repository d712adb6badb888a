"""advpo: AdvPO's uncertainty matrix, once per experiment (Zhang et al. 2024; rlhf/algorithms/advpo.py).

M_D = ridge * I + sum over the proxy RM's training pairs of e_chosen e_chosen^T + e_rejected e_rejected^T, e the RM's
last-layer feature at the reward token (the one its linear head reads): the pairs the rm stage trained on, the same
held-out prompts left out. Written as M_D^-1 (float32) with the ridge and the number of pairs; GRPO runs of methods with
`advpo_budget` read it.
"""
import torch

from rlhf.algorithms.advpo import precision_inverse
from rlhf.io import atomic_file, read_jsonl
from rlhf.models import tokenizer_of
from rlhf.rewards.proxy_rm import load_proxy, split_by_prompt
from rlhf.stages.common import setup
from rlhf.settings import AdvPOSettings


def run(cfg, files, args):
    device = setup(cfg, args)
    rm, ridge = files.inputs["rm"], AdvPOSettings.of(cfg).ridge
    rows = read_jsonl(files.inputs["labels"], required=("prompt", "chosen", "rejected"))
    _, train = split_by_prompt(rows, cfg["rm"]["eval_fraction"], cfg["seed"])  # the rm stage's training pairs
    scorer = load_proxy(rm, cfg, tokenizer_of(rm, cfg), device)
    prompts = [r["prompt"] for r in train]
    chosen = scorer(prompts, [r["chosen"] for r in train]).features
    rejected = scorer(prompts, [r["rejected"] for r in train]).features
    m_inverse = precision_inverse(chosen, rejected, ridge)
    with atomic_file(files.outputs["precision"], "wb") as f:
        torch.save({"m_inverse": m_inverse, "ridge": ridge, "pairs": len(train)}, f)
    print(f"advpo: M_D^-1 ({m_inverse.shape[0]} features) from {len(train)} training pairs, ridge {ridge} "
          f"-> {files.outputs['precision']}")
