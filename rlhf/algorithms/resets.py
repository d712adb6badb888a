"""Reference Resets (GR paper section 4), the scheduled-beta ablation (App. D.4) and Elastic Reset (a baseline).

Steps count optimizer updates, starting at 1. With resets every R updates the KL reference is replaced by
the current policy right after updates R, 2R, ...; iteration i (1-based) is updates (i-1)R+1 .. iR.
The scheduled-beta ablation keeps pi_ref = pi_init and uses beta / i in iteration i.

Elastic Reset (Noukhovitch et al. 2023) keeps an exponential moving average of the policy,
updated after every update (ema <- d*ema + (1-d)*phi, starting at pi_init); right after updates N, 2N, ... the policy
becomes the EMA, then the EMA becomes pi_init. The KL penalty stays against pi_init. The EMA is float32: at the
paper's decay 0.995 an EMA step moves a weight by 0.5% of its distance to the policy, below bf16's resolution
(2^-8 of the weight) almost always, so a bf16 EMA would never move. Open choice (the papers do not say): the optimizer's
moments are kept across a reset, as for Reference Resets.
"""
from __future__ import annotations

import torch


def is_reset_step(step: int, every: int) -> bool:
    """True right after update `step` when the reference is reset (every = 0: never)."""
    return every > 0 and step > 0 and step % every == 0


def iteration(step: int, every: int) -> int:
    """1-based reset iteration that update `step` (1-based) belongs to."""
    return 1 + (step - 1) // every if every > 0 else 1


def scheduled_beta(beta: float, step: int, every: int) -> float:
    """beta / i for update `step` in iteration i; every = 0 keeps beta constant."""
    return beta / iteration(step, every)


@torch.no_grad()
def reset_reference(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """pi_ref <- pi_phi (an exact copy of the current weights)."""
    reference.load_state_dict(policy.state_dict())


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in the EMA's precision (float32)."""
    for e, p in zip(ema, params, strict=True):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1 - decay)


def float32_copy(params) -> list[torch.Tensor]:
    """The EMA's starting point: pi_init's weights in float32 (on their device)."""
    return [p.detach().to(torch.float32).clone() for p in params]
