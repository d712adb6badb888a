"""Per-token log-probabilities of sampled completions under a causal LM."""
from __future__ import annotations

import torch

from rlhf.generation import Rollout, position_ids


def token_logprobs(model, rollout: Rollout, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for every completion token: [N, T] (and the per-token entropy [N, T]).

    The logits at position P-1+t predict completion token t; positions skip the prompt's left padding.
    """
    device = next(model.parameters()).device
    input_ids, mask = rollout.input_ids.to(device), rollout.attention_mask.to(device)
    P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits = logits[:, P - 1:P - 1 + T]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; float64 stays
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, rollout.completion_ids.to(device).unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@torch.no_grad()
def sequence_kl(model, reference, rollout: Rollout, policy_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-completion estimate of KL(pi || pi_ref): sum over its tokens of log pi - log pi_ref. [N]."""
    logp = policy_logprobs if policy_logprobs is not None else token_logprobs(model, rollout)
    ref = token_logprobs(reference, rollout)
    mask = rollout.completion_mask.to(logp.device)
    return ((logp.detach() - ref) * mask).sum(1).cpu()
