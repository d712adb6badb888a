"""UWO, uncertainty-weighted optimization (Coste et al. 2024, code tlc4418/llm_optimization; a SignCert baseline).

K proxy RMs that differ by seed (optionally smaller than the policy, as SignCert's members) score the same completions;
the reward is their mean minus lam times their disagreement:
    penalty "var" — the population variance over members (ddof 0), as the official code (`torch.var(unbiased=False)`
                    in tlc4418/llm_optimization) and Coste et al.'s Eq.;
    penalty "std" — its square root, as the SignCert paper describes UWO ("mean - lambda * std").
With K = 1 the penalty is 0 and the reward is the single RM's.
"""
from __future__ import annotations

import torch

PENALTIES = ("var", "std")


def uncertainty_weighted_reward(rewards: torch.Tensor, lam: float, penalty: str = "var") -> torch.Tensor:
    """rewards [K, N] (member k's reward of completion n) -> [N], in at least float32."""
    if rewards.dim() != 2 or rewards.shape[0] < 1:
        raise ValueError(f"rewards must be [K members, N completions], got shape {tuple(rewards.shape)}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    spread = r.var(dim=0, unbiased=False)
    return r.mean(dim=0) - lam * (spread if penalty == "var" else spread.sqrt())
