"""Diagnostics the two papers plot: on-policy proxy-RM accuracy and BT loss, sharpness, SignCert radius statistics.
They run under a forked RNG with their own seeds, so turning them on or off never changes the training trajectory."""
from __future__ import annotations

import numpy as np
import torch

from rlhf.algorithms.gr import default_perturbed_parameters
from rlhf.algorithms.advantages import degenerate_groups
from rlhf.algorithms.signcert import SignCert
from rlhf.generation import sample
from rlhf.rng import DeviceNoise
from rlhf.stats import preference_metrics


@torch.no_grad()
def onpolicy_rm_accuracy(policy, tokenizer, prompts: list[str], gold, proxy, *, seed: int, temperature: float,
                         max_new_tokens: int) -> dict:
    """Pairs sampled from the current policy, labeled by the gold: the proxy's accuracy and BT loss on them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rollout = sample(policy, tokenizer, prompts, 2, max_new_tokens, temperature)
    a, b = rollout.texts[0::2], rollout.texts[1::2]
    keep = [i for i in range(len(prompts)) if a[i] != b[i]]
    if not keep:
        return {"onpolicy/pairs": 0}
    ps, a, b = [prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]
    prefer_a = gold.prefer(ps, a, b, np.random.default_rng(seed))
    decided = ~np.isnan(prefer_a)  # an unparseable judge answer labels nothing
    if not decided.any():
        return {"onpolicy/pairs": 0}
    margin = (proxy(ps, a).rewards - proxy(ps, b).rewards).numpy()[decided]
    signed = np.where(prefer_a[decided] == 1.0, margin, -margin)  # proxy margin of the gold-preferred completion
    accuracy, bt_loss = preference_metrics(signed)
    return {"onpolicy/rm_accuracy": accuracy, "onpolicy/bt_loss": bt_loss, "onpolicy/pairs": int(decided.sum())}


@torch.no_grad()
def sharpness(policy, tokenizer, prompts: list[str], proxy, *, perturbations: int, radius: float, seed: int,
              temperature: float, max_new_tokens: int) -> dict:
    """S = max_i J(phi) - J(phi + e_i) over random e_i on the transformer blocks, ||e_i|| = radius * ||phi_blocks||.

    J is the mean proxy reward of completions sampled with the same random numbers for every perturbation
    (common random numbers), so differences reflect the parameters, not sampling noise.
    """
    params = default_perturbed_parameters(policy)
    saved = [p.detach().clone() for p in params]
    scale = radius * torch.sqrt(sum((p.float() ** 2).sum() for p in params)).item()

    def objective() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            texts = sample(policy, tokenizer, prompts, 1, max_new_tokens, temperature).texts
        return proxy(prompts, texts).rewards.mean().item()

    base, drops = objective(), []
    noise = DeviceNoise(seed + 1)
    try:
        for _ in range(perturbations):
            direction = [noise.like(p) for p in params]
            norm = torch.sqrt(sum((d ** 2).sum().cpu() for d in direction)).item()
            for p, s, d in zip(params, saved, direction):
                p.copy_((s.float() + scale / norm * d).to(p.dtype))
            drops.append(base - objective())
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return {"sharpness": max(drops), "sharpness/J": base}


def signcert_stats(cert: SignCert, rewards: torch.Tensor, group_size: int) -> dict:
    """What SignCert-PO did to a batch: eps, how many signs it flipped (rho < 0) or removed (rho = 0), how many
    groups were degenerate (all rewards equal, no sign to certify) and the spread of the finite radii."""
    rho, radius = cert.rho, cert.radius
    stats = {"signcert/epsilon": cert.epsilon.item(), "signcert/rho_negative": (rho < 0).float().mean().item(),
             "signcert/rho_zero": (rho == 0).float().mean().item(), "signcert/rho_mean": rho.mean().item(),
             "signcert/degenerate_groups": degenerate_groups(rewards, group_size).float().mean().item()}
    finite = radius[torch.isfinite(radius) & (radius > 0)]
    if finite.numel():
        q = torch.quantile(finite.log10(), torch.tensor([0.1, 0.5, 0.9], dtype=finite.dtype))
        stats.update({"signcert/log10_radius_p10": q[0].item(), "signcert/log10_radius_p50": q[1].item(),
                      "signcert/log10_radius_p90": q[2].item()})
    return stats
