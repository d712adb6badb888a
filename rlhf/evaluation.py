"""Win rate against references judged by the gold, plus gold/proxy reward, KL to a reference and length (RLHF);
accuracy by the rule checker plus the training reward (RLVR).

Used by the evaluate stage (final policy, all test prompts) and inside GRPO (held-out prompts every k steps).
"""
from __future__ import annotations

import numpy as np
import torch

from rlhf.errors import RewardError
from rlhf.generation import sample
from rlhf.policy import sequence_kl
from rlhf.stats import winrate_ci
from rlhf.rewards.verifiable import rule_correct


@torch.no_grad()
def evaluate_policy(policy, tokenizer, rows: list[dict], gold, proxy=None, kl_reference=None, *,
                    temperature: float, max_new_tokens: int, batch_size: int = 64) -> tuple[dict, list[dict]]:
    prompts = [r["prompt"] for r in rows]
    references = [r["reference"] for r in rows]
    rollout = sample(policy, tokenizer, prompts, 1, max_new_tokens, temperature, batch_size)
    outcomes, gold_scores = gold.judge_scored(prompts, rollout.texts, references)
    decided = np.isfinite(outcomes)  # NaN: the judge's answer was unparseable; excluded and counted, not guessed
    if not decided.any():
        raise RewardError(f"the gold decided none of the {len(rows)} comparisons (every judge answer unparseable)")
    win, lo, hi = winrate_ci(outcomes[decided])
    metrics = {"win_rate": win, "win_rate_ci_low": lo, "win_rate_ci_high": hi, "n": int(decided.sum()),
               "unparseable": int((~decided).sum()), "length": float(rollout.lengths.float().mean())}
    per_row = {"prompt": prompts, "completion": rollout.texts, "reference": references,
               "outcome": [float(o) if d else None for o, d in zip(outcomes, decided)]}
    if gold_scores is not None:
        metrics["gold_reward"] = float(np.mean(gold_scores))
        per_row["gold_reward"] = gold_scores.tolist()
    if proxy is not None:
        proxy_rewards = proxy(prompts, rollout.texts).rewards
        metrics["proxy_reward"] = float(proxy_rewards.mean())
        per_row["proxy_reward"] = proxy_rewards.tolist()
    if kl_reference is not None:
        kl = sequence_kl(policy, kl_reference, rollout)
        metrics["kl"] = float(kl.mean())
        per_row["kl"] = kl.tolist()
    completions = [dict(zip(per_row, values)) for values in zip(*per_row.values())]
    return metrics, completions


@torch.no_grad()
def evaluate_rlvr(policy, tokenizer, rows: list[dict], task: str, reward=None, verifier=None, *,
                  temperature: float, max_new_tokens: int, batch_size: int = 64) -> tuple[dict, list[dict]]:
    """pass@1: one sampled completion per test question, solved or not by the rule checker whatever the training
    reward (so a policy that fools a judge shows falling accuracy), with a 95% CI; with `reward` (the training
    reward over these rows), its mean and each term's mean."""
    prompts = [r["prompt"] for r in rows]
    rollout = sample(policy, tokenizer, prompts, 1, max_new_tokens, temperature, batch_size)
    correct = rule_correct(task, rollout.texts, [r["solution"] for r in rows], verifier)
    accuracy, lo, hi = winrate_ci(np.array(correct, dtype=float))
    metrics = {"accuracy": accuracy, "accuracy_ci_low": lo, "accuracy_ci_high": hi, "n": len(rows),
               "length": float(rollout.lengths.float().mean())}
    per_row = {"prompt": prompts, "completion": rollout.texts, "correct": correct,
               **{k: [r.get(k) for r in rows] for k in ("level", "type") if k in rows[0]}}
    if reward is not None:
        scored = reward(prompts, rollout.texts)
        metrics.update({"reward": float(scored.rewards.mean()), **{f"reward/{k}": v for k, v in scored.terms.items()},
                        "judge/unparseable_fraction": scored.unparseable / len(rows)})
        per_row["reward"] = scored.rewards.tolist()
    return metrics, [dict(zip(per_row, values)) for values in zip(*per_row.values())]
