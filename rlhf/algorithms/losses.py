import torch


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(q - p) - (q - p) - 1, p policy, q reference log-prob.

    Non-negative, unbiased for samples from pi, and its gradient is that of the sampled KL (Schulman, 2020).
    """
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def dr_grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                 mask: torch.Tensor, max_tokens: int, clip_eps: float = 0.2,
                 ref_logprobs: torch.Tensor | None = None, kl_beta: float = 0.0) -> torch.Tensor:
    """Dr.GRPO: clipped per-token surrogate (+ beta * k3 KL), summed over tokens and divided by the
    constant N * T_max (N = B*G completions), not by each completion's own length.

    logprobs/old_logprobs/ref_logprobs/mask: [N, T]; advantages: [N] (treated as constants).
    old_logprobs=None is the on-policy case of one update per batch: the ratio is 1 and the gradient is REINFORCE
    with the group-mean baseline divided by N * T_max. The ratio is then written 1 + (p - stop_grad(p)), not
    exp(p - stop_grad(p)): same value and gradient, but its second derivative is that of the REINFORCE potential,
    so double backprop (GR's hvp estimator) differentiates the gradient field the trainer follows at every phi.
    Through exp() it would add the outer product A * grad p grad p^T, which no trainer sees.
    Stored old log-probs (a PPO epoch, or the authors' GR second pass) give the usual ratio exp(p - old).
    """
    if old_logprobs is None:
        ratio = 1.0 + (logprobs - logprobs.detach())
    else:
        ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.detach().unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta:
        per_token = per_token + kl_beta * k3_kl(logprobs, ref_logprobs)
    return (per_token * mask).sum() / (mask.shape[0] * max_tokens)
