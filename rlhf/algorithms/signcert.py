"""SignCert-PO (SignCert paper section 3; PAPERS.md section 5).

For a reward model r = w^T h + b and Dr.GRPO advantages A_j = r_j - mean of its group, the smallest head
perturbation ||delta|| that flips the sign of A_j is the certified radius  Delta_j = |A_j| / ||h_j - h_bar||
(h_bar the mean feature of the group). SignCert-PO replaces A_j by rho_j * A_j with rho_j = 1 - eps / Delta_j,
eps set per batch as a quantile of the radii.

Shapes: advantages [N], features [N, d], N = prompts x group_size, the completions of one prompt contiguous.
Quantiles are torch.quantile's default linear interpolation, over the batch given; in distributed runs
pass the global batch (all ranks' advantages and features).
"""
from __future__ import annotations

import torch


def _feature_deviation(features: torch.Tensor, group_size: int) -> torch.Tensor:
    """||h_j - h_bar||_2 with h_bar the mean feature of j's group. [N]"""
    n, d = features.shape
    if n % group_size:
        raise ValueError(f"{n} completions do not split into groups of {group_size}")
    h = features.float().view(-1, group_size, d)
    return (h - h.mean(dim=1, keepdim=True)).norm(dim=-1).view(-1)


def certified_radius(advantages: torch.Tensor, features: torch.Tensor, group_size: int) -> torch.Tensor:
    """Delta_j = |A_j| / ||h_j - h_bar||: 0 where A_j = 0 (also when h_j = h_bar), +inf where only h_j = h_bar."""
    a = advantages.float().abs()
    dev = _feature_deviation(features, group_size)
    radius = a / dev.clamp_min(torch.finfo(torch.float32).tiny)
    radius = torch.where(dev == 0, torch.full_like(a, float("inf")), radius)
    return torch.where(a == 0, torch.zeros_like(a), radius)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile interpolates inf - inf to NaN; the largest finite float stands in for +inf so that a
    # quantile landing between a finite value and an infinite one is huge instead of undefined.
    big = torch.finfo(values.dtype).max
    return torch.quantile(values.nan_to_num(posinf=big), q)


def signcert_weights(advantages: torch.Tensor, features: torch.Tensor, group_size: int, quantile: float, *,
                     epsilon_from: str = "radius", clip_negative: bool = True) -> torch.Tensor:
    """The multipliers rho_j of SignCert-PO (so the advantage used is rho * A, treated as a constant).

    epsilon_from="radius" (default): eps = Quantile_q({Delta_j}), so a fraction q of completions gets rho <= 0.
    epsilon_from="inverse_radius": eps = Quantile_q({||h_j - h_bar|| / |A_j|}), literally Algorithm 1 of the paper.
    clip_negative=True: rho_j = max(0, 1 - eps/Delta_j) (completions inside the radius are removed);
    False keeps negative rho (their advantage sign is flipped).
    A_j = 0 gives rho_j = 0; h_j = h_bar with A_j != 0 gives rho_j = 1.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError("quantile must lie in [0, 1]")
    radius = certified_radius(advantages, features, group_size)
    if epsilon_from == "radius":
        eps = _quantile(radius, quantile)
    elif epsilon_from == "inverse_radius":
        eps = _quantile(1.0 / radius, quantile)  # 1/0 = inf for A = 0, 1/inf = 0 for h = h_bar
    else:
        raise ValueError("epsilon_from must be 'radius' or 'inverse_radius'")
    finite = torch.isfinite(radius) & (radius > 0)
    rho = torch.ones_like(radius)  # h_j = h_bar (infinite radius): the sign cannot flip
    rho[finite] = 1.0 - eps / radius[finite]
    rho[radius == 0] = 0.0
    return rho.clamp_min(0.0) if clip_negative else rho
