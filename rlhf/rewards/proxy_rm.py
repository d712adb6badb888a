"""Scoring with a sequence-classification reward model: the reward and the feature it was read from.

r = w^T h + b with h the last-layer hidden state at the reward token. SignCert-PO needs h, so the scorer
runs the backbone once and applies the linear head itself, instead of a second forward pass.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf.errors import RewardError
from rlhf.models import rm_input_ids


@dataclass
class Scores:
    rewards: torch.Tensor   # [N] float32
    features: torch.Tensor  # [N, d] float32


def reward_head(model) -> torch.nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    raise RewardError(f"{type(model).__name__}: reward model without a linear `score`/`classifier` head")


def reward_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Last non-pad token of each row: the position transformers' sequence classifiers pool from."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return ((input_ids != pad_token_id).long() * positions).argmax(-1)


class RewardScorer:
    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.head = reward_head(model)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        rewards, features = [], []
        for start in range(0, len(prompts), self.batch_size):
            seqs = [rm_input_ids(self.tokenizer, p, c)
                    for p, c in zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size])]
            if self.max_length:
                seqs = [s[-self.max_length:] for s in seqs]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            h = hidden[torch.arange(len(seqs), device=device), reward_token_index(ids, pad)]
            rewards.append(self.head(h).squeeze(-1).float())
            features.append(h.float())
        scores = Scores(torch.cat(rewards).cpu(), torch.cat(features).cpu())
        bad = (~torch.isfinite(scores.rewards)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward model returned a non-finite reward for {len(bad)} completion(s), "
                              f"first: prompt {prompts[bad[0]]!r} / completion {completions[bad[0]]!r}")
        return scores


class EnsembleScorer:
    """UWO's reward: each member RM scores the completions (with its own tokenizer); the reward is their mean minus
    lam times their disagreement (rlhf.algorithms.ensemble). No single head, so no feature (SignCert is refused)."""

    def __init__(self, members: list[RewardScorer], lam: float, penalty: str):
        self.members, self.lam, self.penalty = members, lam, penalty

    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
        from rlhf.algorithms.ensemble import uncertainty_weighted_reward
        rewards = torch.stack([member(prompts, completions).rewards for member in self.members])
        return Scores(uncertainty_weighted_reward(rewards, self.lam, self.penalty), torch.empty(len(prompts), 0))


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(held out, train): a random `fraction` of the prompts (at least one) with all their pairs held out, so
    with several pairs per prompt no held-out prompt is also trained on."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, int(len(prompts) * fraction))])
    return [r for r in rows if r["prompt"] in held], [r for r in rows if r["prompt"] not in held]


class AdvPOScorer:
    """AdvPO's reward (rlhf/algorithms/advpo.py): the proxy RM's features times the most pessimistic head within the
    budget, g from this batch's completions against the references of its prompts. `gather` collects a tensor over
    the data-parallel ranks (g is the global batch's, as every rank's adversarial head must be the same)."""

    def __init__(self, proxy: RewardScorer, m_inverse: torch.Tensor, budget: float, references: dict[str, str],
                 gather=lambda t: t):
        self.proxy, self.m_inverse, self.budget = proxy, m_inverse, budget
        self.references, self.gather = references, gather

    def on_one_rank(self, references: dict[str, str]) -> "AdvPOScorer":
        """The same reward for a caller that scores alone (rank 0's held-out evaluation and diagnostics): g from the
        batch it is given, never gathered (the other ranks wait at a barrier, so a gather would hang), and the
        references of these prompts too."""
        return AdvPOScorer(self.proxy, self.m_inverse, self.budget, {**self.references, **references})

    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
        from rlhf.algorithms.advpo import adversarial_head
        scores = self.proxy(prompts, completions)
        unique = list(dict.fromkeys(prompts))
        refs = self.proxy(unique, [self.references[p] for p in unique]).features
        head = self.proxy.head.weight.detach()[0].float().cpu()
        bias = self.proxy.head.bias.detach().float().cpu()[0] if self.proxy.head.bias is not None else 0.0
        phi = adversarial_head(head, self.m_inverse, self.gather(scores.features), self.gather(refs), self.budget)
        return Scores(scores.features @ phi + bias, scores.features)
