"""BSPO (Dai et al. 2025, "Mitigating reward over-optimization in RLHF via behavior-supported regularization").

The reward model keeps its language-model head ("ScoreLM"): trained on the preference data with

    L = -log sigmoid(r(x, y_c) - r(x, y_r)) - alpha * log beta(a_t | x, a_<t)

where beta, the behavior policy, is the next-token distribution of the RM's training completions. Its support is the
region where the reward model was fit: an action a_t with beta(a_t | s_t) <= threshold is out of distribution, and the
behavior-supported Bellman operator gives its value the minimum (Q_min) instead of the RM's extrapolation.

Dr.GRPO has no value model, only one reward per completion, so the operator enters as the completion's reward: a
completion with any token outside the support gets r_min (the paper's PPO sets the Q-value of the unsupported action to
Q_min; with one terminal reward and no bootstrapping the completion's return is that of its least-supported action).
No source settles the threshold, alpha or r_min: they are config fields (bspo section, grpo.bspo_threshold,
grpo.bspo_r_min), and the bspo stage reports the unsupported fraction of held-out completions per threshold so the
threshold can be set where the SFT policy's own completions are inside the support.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scorelm_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, token_logprobs: torch.Tensor,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, behavior NLL): the Bradley-Terry loss averaged over pairs plus alpha times the mean negative
    log-likelihood of the completions' tokens (both completions of every pair, EOS included: the policy chooses where
    to stop, so stopping is an action too). token_logprobs: log beta of every completion token in the batch, flat."""
    bradley_terry = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    behavior_nll = -token_logprobs.mean()
    return bradley_terry + alpha * behavior_nll, behavior_nll


def least_supported(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N]: each completion's smallest log beta over its tokens (mask [N, T] marks them; +inf where it has none)."""
    return token_logprobs.masked_fill(~mask.bool(), float("inf")).min(dim=1).values


def behavior_supported_rewards(rewards: torch.Tensor, min_logprobs: torch.Tensor, threshold: float,
                               r_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, unsupported): r_min for a completion with a token whose beta <= threshold, the RM's reward otherwise."""
    unsupported = min_logprobs <= torch.log(torch.tensor(threshold, dtype=min_logprobs.dtype))
    return torch.where(unsupported, torch.as_tensor(r_min, dtype=rewards.dtype), rewards), unsupported
