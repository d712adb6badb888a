"""Reference Resets (GR paper section 4) and the scheduled-beta ablation (App. D.4).

Steps count optimizer updates, starting at 1. With resets every R updates the KL reference is replaced by
the current policy right after updates R, 2R, ...; iteration i (1-based) is updates (i-1)R+1 .. iR.
The scheduled-beta ablation keeps pi_ref = pi_init and uses beta / i in iteration i.
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
