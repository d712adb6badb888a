import torch


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean of its group (Dr.GRPO: no division by the group std).

    rewards: [N] with the completions of one prompt contiguous (prompt index = i // group_size).
    A degenerate group (all rewards equal) gets exactly zero advantages: the rounded mean of equal floats can
    differ from them by an ulp, and SignCert-PO tells degenerate groups apart by A == 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    return advantages.masked_fill(degenerate_groups(rewards, group_size).unsqueeze(1), 0.0).view(-1)


def degenerate_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / group_size] bool: the groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)
