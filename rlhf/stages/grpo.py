"""grpo: Dr.GRPO against the proxy RM (PAPERS.md section 2), one file, top to bottom.

Each step: B prompts -> G completions each -> proxy reward -> group-mean advantages -> per-token loss summed
over tokens / (B*G*T_max) (+ beta * k3 KL to a reference) -> clip the gradient norm -> AdamW step.
A regularizer is a short local addition in `grpo_step`. Every step is logged to metrics.jsonl; every
`eval_every` steps the gold judges the policy on held-out prompts; checkpoints make the run resumable.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import trange

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.losses import dr_grpo_loss
from rlhf.config import grpo_settings
from rlhf.evaluation import evaluate_policy
from rlhf.generation import sample
from rlhf.io import atomic_dir, read_jsonl
from rlhf.metrics_log import MetricsLog
from rlhf.models import load_causal_lm, load_reward_model
from rlhf.paths import Paths
from rlhf.policy import token_logprobs
from rlhf.rewards.gold import make_gold
from rlhf.rewards.proxy_rm import RewardScorer
from rlhf.stages.common import setup, sft_tokenizer


def grpo_step(policy, optimizer, rollout, rewards, ref_logprobs, s: dict) -> dict:
    """One Dr.GRPO update on one batch of rollouts; returns the step's statistics."""
    advantages = dr_grpo_advantages(rewards, s["group_size"]).to(rollout.completion_ids.device)
    mask = rollout.completion_mask.to(next(policy.parameters()).device).float()
    logprobs, entropy = token_logprobs(policy, rollout, with_entropy=True)
    loss = dr_grpo_loss(logprobs, logprobs.detach(), advantages, mask, s["max_new_tokens"], s["clip_eps"],
                        ref_logprobs, s["kl_beta"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), s["max_grad_norm"])
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(),
            "entropy": ((entropy.detach() * mask).sum() / mask.sum()).item(),
            "logprobs": logprobs.detach()}


def fingerprint(cfg: dict, settings: dict, seed: int, inputs: list[Path]) -> str:
    """Identifies what a checkpoint was trained from, so a rerun with another RM or config starts afresh."""
    stamp = {"settings": settings, "seed": seed, "experiment": cfg["experiment"],
             "inputs": {str(p): [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.glob("*.safetensors"))]
                        for p in inputs}}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, policy, optimizer, step: int, stamp: str) -> None:
    with atomic_dir(path) as out:
        policy.save_pretrained(out)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "fingerprint": stamp,
                    "python_rng": random.getstate(), "torch_rng": torch.get_rng_state()}, out / "trainer_state.pt")


def load_checkpoint(path: Path, policy, optimizer, stamp: str) -> int:
    """Restore a matching checkpoint and return its step (0 when there is none or it is stale)."""
    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, weights_only=False)
    if state["fingerprint"] != stamp:
        print(f"grpo: ignoring checkpoint {path}: trained from other inputs or settings")
        shutil.rmtree(path)
        return 0
    # from_pretrained re-ties shared embeddings that save_pretrained stored once; then a strict copy.
    saved = type(policy).from_pretrained(path, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    print(f"grpo: resumed from step {state['step']} ({path})")
    return state["step"]


def run(cfg, args):
    method, seed = args.method, args.seed
    s = grpo_settings(cfg, method)
    device = setup(cfg, args, seed=seed)
    P = Paths.from_config(cfg)
    out_dir, ckpt_dir = P.grpo(method, seed), P.grpo(method, seed) / "checkpoint"
    prompts = [r["prompt"] for r in read_jsonl(P.train, required=("prompt",))]
    heldout = read_jsonl(P.test, required=("prompt", "reference"))[: s["eval_prompts"]]

    tokenizer = sft_tokenizer(cfg)
    policy = load_causal_lm(P.sft, cfg["model"]["dtype"], device)
    initial = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_init: KL reference and KL-from-init metric
    reference = initial
    proxy = RewardScorer(load_reward_model(P.rm, tokenizer, cfg["model"]["dtype"], device).requires_grad_(False),
                         tokenizer, cfg["rm"]["batch_size_scoring"])
    gold = make_gold(cfg, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])

    stamp = fingerprint(cfg, s, seed, [P.sft, P.rm])
    start = load_checkpoint(ckpt_dir, policy, optimizer, stamp)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start, cfg=cfg, run_name=f"grpo-{method}-seed{seed}",
                     run_config={"method": method, "seed": seed, **s})
    eval_kwargs = dict(temperature=s["temperature"], max_new_tokens=s["max_new_tokens"])

    def gold_eval(step: int) -> None:
        metrics, _ = evaluate_policy(policy, tokenizer, heldout, gold, proxy, initial, **eval_kwargs)
        log.write(step, {f"eval/{k}": v for k, v in metrics.items()})

    if start == 0:
        gold_eval(0)
    B, G = s["prompts_per_step"], s["group_size"]
    for step in trange(start, s["steps"], desc=f"grpo {method} seed{seed}", initial=start, total=s["steps"]):
        t0 = time.perf_counter()
        batch = random.sample(prompts, B)
        rollout = sample(policy, tokenizer, batch, G, s["max_new_tokens"], s["temperature"], batch_size=B * G)
        t1 = time.perf_counter()
        rewards = proxy([p for p in batch for _ in range(G)], rollout.texts).rewards
        t2 = time.perf_counter()
        with torch.no_grad():  # the KL-from-init metric needs these anyway; the KL penalty reuses them
            init_logprobs = token_logprobs(initial, rollout)
            ref_logprobs = init_logprobs if reference is initial else token_logprobs(reference, rollout)
        policy.train()
        stats = grpo_step(policy, optimizer, rollout, rewards, ref_logprobs, s)
        t3 = time.perf_counter()
        kl = ((stats.pop("logprobs") - init_logprobs) * rollout.completion_mask.to(device)).sum(1).mean().item()
        log.write(step + 1, {"proxy_reward": rewards.mean().item(), "kl": kl,
                             "length": rollout.lengths.float().mean().item(), **stats,
                             "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
                             "time/step": time.perf_counter() - t0})
        if (step + 1) % s["eval_every"] == 0 or step + 1 == s["steps"]:
            gold_eval(step + 1)
        if (step + 1) % s["checkpoint_every"] == 0 and step + 1 < s["steps"]:
            save_checkpoint(ckpt_dir, policy, optimizer, step + 1, stamp)

    with atomic_dir(P.policy(method, seed)) as out:
        policy.save_pretrained(out)
        tokenizer.save_pretrained(out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.close()
    print(f"grpo: {method} seed {seed}: {s['steps']} steps -> {P.policy(method, seed)}")
