"""Scoring with a sequence-classification reward model: the reward and the feature it was read from.

r = w^T h + b with h the last-layer hidden state at the reward token. SignCert-PO needs h, so the scorer
runs the backbone once and applies the linear head itself, instead of a second forward pass.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algorithms.advpo import adversarial_head
from rlhf.algorithms.bspo import behavior_supported_rewards, least_supported
from rlhf.algorithms.ensemble import uncertainty_weighted_reward
from rlhf.errors import RewardError
from rlhf.models import (attach_behavior_head, behavior_token_logprobs, encode_prompt, load_reward_model, rm_input_ids,
                         tokenizer_of)


@dataclass
class Scores:
    rewards: torch.Tensor   # [N] float32
    features: torch.Tensor  # [N, d] float32
    unsupported: torch.Tensor | None = None  # [N] bool, BSPO only: a token outside the behavior support


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

    def batches(self, prompts: list[str], completions: list[str]):
        """Right-padded batches of the RM's inputs: (input_ids, attention_mask, completion_start) on the model's
        device; completion_start is where each row's completion tokens begin (after left truncation to max_length)."""
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            pairs = list(zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size]))
            seqs = [rm_input_ids(self.tokenizer, p, c) for p, c in pairs]
            starts = [len(encode_prompt(self.tokenizer, p)) for p, _ in pairs]
            if self.max_length:
                starts = [max(0, b - max(0, len(s) - self.max_length)) for s, b in zip(seqs, starts)]
                seqs = [s[-self.max_length:] for s in seqs]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            yield ids.to(device), mask.to(device), torch.tensor(starts, device=device)

    def reward_and_feature(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden[torch.arange(len(ids), device=ids.device), reward_token_index(ids, self.model.config.pad_token_id)]
        return self.head(h).squeeze(-1).float(), h.float()

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
        rewards, features = [], []
        for ids, mask, _ in self.batches(prompts, completions):
            reward, feature = self.reward_and_feature(self.model.base_model(input_ids=ids, attention_mask=mask)
                                                      .last_hidden_state, ids)
            rewards.append(reward)
            features.append(feature)
        return self.checked(prompts, completions, Scores(torch.cat(rewards).cpu(), torch.cat(features).cpu()))

    @staticmethod
    def checked(prompts: list[str], completions: list[str], scores: Scores) -> Scores:
        bad = (~torch.isfinite(scores.rewards)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward model returned a non-finite reward for {len(bad)} completion(s), "
                              f"first: prompt {prompts[bad[0]]!r} / completion {completions[bad[0]]!r}")
        return scores


class BSPOScorer(RewardScorer):
    """BSPO's reward (rlhf/algorithms/bspo.py): the ScoreLM's reward, or r_min for a completion with a token whose
    behavior probability is at most `threshold`. One backbone pass gives both: the score head at the reward token, the
    LM head at every completion position (in chunks of `chunk_tokens`, so [tokens, vocab] logits stay bounded at a
    paper-scale vocabulary). `behavior` gives the unreplaced reward and log beta (the bspo stage's calibration)."""

    def __init__(self, model, tokenizer, batch_size: int, threshold: float, r_min: float,
                 max_length: int | None = None, chunk_tokens: int = 1024):
        super().__init__(model, tokenizer, batch_size, max_length)
        self.threshold, self.r_min, self.chunk_tokens = threshold, r_min, chunk_tokens

    @torch.no_grad()
    def least_supported(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        starts: torch.Tensor) -> torch.Tensor:
        """[N]: min over each completion's tokens (EOS included) of log beta(token | prefix)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        predicted = ((positions >= starts[:, None]) & mask.bool())[:, 1:]  # tokens 1..T-1 of each completion
        token_logprobs = torch.zeros(predicted.shape, device=ids.device)
        token_logprobs[predicted] = behavior_token_logprobs(self.model, hidden, ids, predicted, self.chunk_tokens)
        return least_supported(token_logprobs, predicted)

    @torch.no_grad()
    def behavior(self, prompts: list[str], completions: list[str]) -> tuple[Scores, torch.Tensor]:
        """(the ScoreLM's scores, each completion's least-supported log beta)."""
        rewards, features, least = [], [], []
        for ids, mask, starts in self.batches(prompts, completions):
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            reward, feature = self.reward_and_feature(hidden, ids)
            rewards.append(reward)
            features.append(feature)
            least.append(self.least_supported(hidden, ids, mask, starts))
        scores = Scores(torch.cat(rewards).cpu(), torch.cat(features).cpu())
        return self.checked(prompts, completions, scores), torch.cat(least).cpu()

    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
        scores, least = self.behavior(prompts, completions)
        rewards, unsupported = behavior_supported_rewards(scores.rewards, least, self.threshold, self.r_min)
        return Scores(rewards, scores.features, unsupported)


class EnsembleScorer:
    """UWO's reward: each member RM scores the completions (with its own tokenizer); the reward is their mean minus
    lam times their disagreement (rlhf.algorithms.ensemble). No single head, so no feature (SignCert is refused)."""

    def __init__(self, members: list[RewardScorer], lam: float, penalty: str):
        self.members, self.lam, self.penalty = members, lam, penalty

    def __call__(self, prompts: list[str], completions: list[str]) -> Scores:
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
        scores = self.proxy(prompts, completions)
        unique = list(dict.fromkeys(prompts))
        refs = self.proxy(unique, [self.references[p] for p in unique]).features
        head = self.proxy.head.weight.detach()[0].float().cpu()
        bias = self.proxy.head.bias.detach().float().cpu()[0] if self.proxy.head.bias is not None else 0.0
        phi = adversarial_head(head, self.m_inverse, self.gather(scores.features), self.gather(refs), self.budget)
        return Scores(scores.features @ phi + bias, scores.features)


def load_proxy(folder, cfg: dict, tokenizer, device) -> RewardScorer:
    """The trained proxy RM (frozen) behind the scorer that returns rewards and features."""
    model = load_reward_model(folder, tokenizer, cfg["model"]["dtype"], device)
    return RewardScorer(model.eval().requires_grad_(False), tokenizer, cfg["rm"]["batch_size_scoring"])


def load_bspo(folder: Path, cfg: dict, settings, tokenizer, device) -> BSPOScorer:
    """BSPO's reward: the ScoreLM (frozen) with its LM head; r_min from its metrics unless the method sets one."""
    model = load_reward_model(folder, tokenizer, cfg["model"]["dtype"], device)
    attach_behavior_head(model, folder)
    r_min = settings.bspo_r_min
    if r_min is None:
        r_min = json.loads((Path(folder) / "metrics.json").read_text())["r_min_train"]
    return BSPOScorer(model.eval().requires_grad_(False), tokenizer, cfg["rm"]["batch_size_scoring"],
                      settings.bspo_threshold, r_min)


# The loaders of rlhf/rewards/kinds.py: (RewardContext) -> the reward a GRPO run trains on.

def load_proxy_reward(ctx) -> RewardScorer:
    return load_proxy(ctx.inputs["rm"][0], ctx.cfg, ctx.tokenizer, ctx.device)


def load_uwo_reward(ctx) -> EnsembleScorer:
    """UWO: the ensemble's members, each with its own tokenizer."""
    members = [load_proxy(folder, ctx.cfg, tokenizer_of(folder, ctx.cfg), ctx.device)
               for folder in ctx.inputs["ensemble"]]
    return EnsembleScorer(members, ctx.settings.uwo_lambda, ctx.settings.uwo_penalty)


def load_advpo_reward(ctx) -> AdvPOScorer:
    """AdvPO: the proxy with the adversarial head; M_D^-1 from the advpo stage, g over the global batch."""
    stats = torch.load(ctx.inputs["advpo"][0], weights_only=True)
    return AdvPOScorer(load_proxy(ctx.inputs["rm"][0], ctx.cfg, ctx.tokenizer, ctx.device), stats["m_inverse"],
                       ctx.settings.advpo_budget, {r["prompt"]: r["reference"] for r in ctx.rows},
                       gather=ctx.dist.gather)


def load_bspo_reward(ctx) -> BSPOScorer:
    return load_bspo(ctx.inputs["bspo"][0], ctx.cfg, ctx.settings, ctx.tokenizer, ctx.device)
