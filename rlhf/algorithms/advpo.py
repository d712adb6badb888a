"""AdvPO's adversarial reward head (Zhang et al. 2024, "Overcoming Reward Overoptimization via Adversarial Policy
Optimization with Lightweight Uncertainty Estimation"; no public code).

The proxy RM's reward is linear in its last-layer feature e(x, y): r = e^T phi_hat. Its uncertainty about a direction
of feature space is measured by the RM's own training data,
    M_D = ridge * I + sum over the RM's training pairs (e_chosen e_chosen^T + e_rejected e_rejected^T),
and AdvPO optimizes the policy against the most pessimistic head within the confidence ellipsoid
(phi - phi_hat)^T M_D (phi - phi_hat) <= B. For the objective E_pi[e]^T phi - E_ref[e]^T phi that worst case is
    g = E_{y~pi}[e] - E_{y_ref}[e],   lambda* = sqrt(g^T M_D^-1 g / B),   phi_adv = phi_hat - M_D^-1 g / lambda*,
which sits on the ellipsoid's boundary and lowers the reward of completions whose features moved from the
references' in the direction g, the more so where the RM's data says little (large M_D^-1 along g).
B = 0 (or g = 0) leaves phi_hat. The ridge keeps M_D invertible when the RM's features span fewer than d directions.
"""
from __future__ import annotations

import torch


def precision_inverse(chosen: torch.Tensor, rejected: torch.Tensor, ridge: float) -> torch.Tensor:
    """M_D^-1 from the RM's training pairs' features (each [P, d]); computed in float64, returned in float32 or the
    features' wider precision. ridge must be > 0 (it is what makes a rank-deficient M_D invertible)."""
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (M_D = ridge*I + sum e e^T is singular otherwise), got {ridge}")
    features = torch.cat([chosen, rejected]).to(torch.float64)
    m = ridge * torch.eye(features.shape[1], dtype=torch.float64) + features.T @ features
    return torch.linalg.inv(m).to(torch.promote_types(chosen.dtype, torch.float32))


def adversarial_head(head: torch.Tensor, m_inverse: torch.Tensor, policy_features: torch.Tensor,
                     reference_features: torch.Tensor, budget: float) -> torch.Tensor:
    """phi_adv [d] for head phi_hat [d], M_D^-1 [d, d], the policy's completion features [N, d] and the reference
    completions' [M, d]; budget B >= 0."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    dtype = torch.promote_types(head.dtype, torch.float32)
    g = (policy_features.to(dtype).mean(0) - reference_features.to(dtype).mean(0))
    direction = m_inverse.to(dtype) @ g
    quad = g @ direction
    if budget == 0 or quad <= 0:
        return head.to(dtype).clone()
    return head.to(dtype) - direction * torch.sqrt(budget / quad)
