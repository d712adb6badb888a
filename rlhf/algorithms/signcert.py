"""SignCert-PO (SignCert paper Sec. 3).

For a reward model r = w^T h + b and Dr.GRPO advantages A_j = r_j - mean of its group, the smallest head
perturbation ||delta|| that flips the sign of A_j is the certified radius  Delta_j = |A_j| / ||h_j - h_bar||
(h_bar the mean feature of the group). Against an adversary that may move the head by ||delta|| <= eps for each
completion separately, the worst-case advantage is
    A~_j = A_j - eps * sign(A_j) * ||h_j - h_bar|| = rho_j * A_j,   rho_j = 1 - eps / Delta_j,
and SignCert-PO uses it in place of A_j: "SignCert-PO thus replaces each advantage with its worst-case value"
(Eq. 11, Theorem 3.2, App. D). Inside the radius (Delta_j < eps) rho_j is negative: the adversary flips the sign,
so a completion whose reward could as well be below its group's mean is pushed down. That is the paper-faithful
default here. The prose's "effectively removed" (rho clipped at 0) is the `clip_negative=True` ablation; it cannot
push a hacking completion with a positive advantage down, and on the paper's bandit it leaks (docs/miniature.md).

eps is set per batch as the quantile q of the radii over the completions with A_j != 0. Completions of a degenerate
group (all rewards equal) carry no sign to certify; counting their zero radii would drag eps towards 0 whenever many
groups are degenerate (our reading of SignCert Sec. 3). `quantile_over="all"` counts them anyway (ablation).

Shapes: advantages [N], features [N, d], N = prompts x group_size, the completions of one prompt contiguous.
Quantiles are torch.quantile's default linear interpolation, over the batch given; in distributed runs pass the
global batch (all ranks' advantages and features). Results keep the inputs' precision (at least float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SignCert:
    rho: torch.Tensor      # [N] multipliers: the advantage used is rho * A (a constant for the gradient)
    epsilon: torch.Tensor  # scalar: the head-perturbation budget of this batch
    radius: torch.Tensor   # [N] certified radii Delta_j


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The inputs' common precision, at least float32 (bf16 features from an RM are upcast, float64 stays)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _feature_deviation(features: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """||h_j - h_bar||_2 with h_bar the mean feature of j's group. [N]"""
    n, d = features.shape
    if n % group_size:
        raise ValueError(f"{n} completions do not split into groups of {group_size}")
    h = features.to(dtype).view(-1, group_size, d)
    return (h - h.mean(dim=1, keepdim=True)).norm(dim=-1).view(-1)


def certified_radius(advantages: torch.Tensor, features: torch.Tensor, group_size: int) -> torch.Tensor:
    """Delta_j = |A_j| / ||h_j - h_bar||: 0 where A_j = 0 (also when h_j = h_bar), +inf where only h_j = h_bar."""
    dtype = _dtype(advantages, features)
    a = advantages.to(dtype).abs()
    dev = _feature_deviation(features, group_size, dtype)
    radius = a / dev.clamp_min(torch.finfo(dtype).tiny)
    radius = torch.where(dev == 0, torch.full_like(a, float("inf")), radius)
    return torch.where(a == 0, torch.zeros_like(a), radius)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile interpolates inf - inf to NaN; the largest finite float stands in for +inf so that a
    # quantile landing between a finite value and an infinite one is huge instead of undefined.
    if values.numel() == 0:
        return values.new_zeros(())
    big = torch.finfo(values.dtype).max
    return torch.quantile(values.nan_to_num(posinf=big), q)


def signcert(advantages: torch.Tensor, features: torch.Tensor, group_size: int, quantile: float, *,
             epsilon_from: str = "radius", quantile_over: str = "nonzero", clip_negative: bool = False) -> SignCert:
    """SignCert-PO's multipliers rho_j, with the batch's eps and the radii.

    epsilon_from="radius" (default): eps = Quantile_q({Delta_j}), so a fraction q of the completions it is taken
    over gets rho <= 0. "inverse_radius": eps = Quantile_q({||h_j - h_bar|| / |A_j|}), Algorithm 1 literally.
    quantile_over="nonzero" (default): over completions with A_j != 0; "all": over every completion.
    clip_negative=False (default): rho_j = 1 - eps/Delta_j, the worst case; True: max(0, 1 - eps/Delta_j).
    A_j = 0 gives rho_j = 0; h_j = h_bar with A_j != 0 gives rho_j = 1 (no head change moves A_j).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError("quantile must lie in [0, 1]")
    if quantile_over not in ("nonzero", "all"):
        raise ValueError("quantile_over must be 'nonzero' or 'all'")
    radius = certified_radius(advantages, features, group_size)
    pool = radius[advantages != 0] if quantile_over == "nonzero" else radius
    if epsilon_from == "radius":
        eps = _quantile(pool, quantile)
    elif epsilon_from == "inverse_radius":
        eps = _quantile(1.0 / pool, quantile)  # 1/0 = inf for A = 0, 1/inf = 0 for h = h_bar
    else:
        raise ValueError("epsilon_from must be 'radius' or 'inverse_radius'")
    finite = torch.isfinite(radius) & (radius > 0)
    rho = torch.ones_like(radius)  # h_j = h_bar (infinite radius): the sign cannot flip
    rho[finite] = 1.0 - eps / radius[finite]
    rho[radius == 0] = 0.0
    return SignCert(rho.clamp_min(0.0) if clip_negative else rho, eps, radius)


def signcert_weights(advantages: torch.Tensor, features: torch.Tensor, group_size: int, quantile: float,
                     **options) -> torch.Tensor:
    """Only rho of `signcert` (same options)."""
    return signcert(advantages, features, group_size, quantile, **options).rho
