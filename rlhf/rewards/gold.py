"""The gold: the preference oracle that labels pairs and judges win rates.

Backends: `programmatic` (the miniature's true reward) and `reward_model` (any HF sequence-classification
model, e.g. Skywork-Reward-Llama-3.1-8B-v0.2). An API judge (GPT-4.1-nano) plugs in by implementing
`prefer` and `judge` directly; score-based golds get both from `score`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from rlhf.errors import ConfigError, RewardError


class Gold(ABC):
    """prefer: 1.0 where a is preferred to b, else 0.0. judge: 1 win, 0.5 tie, 0 loss of candidate vs reference."""

    @abstractmethod
    def prefer(self, prompts: list[str], a: list[str], b: list[str], rng: np.random.Generator) -> np.ndarray: ...

    @abstractmethod
    def judge(self, prompts: list[str], candidates: list[str], references: list[str]) -> np.ndarray: ...

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray | None:
        """Scalar gold reward where the gold has one (None for pairwise-only judges)."""
        return None


class ScoreGold(Gold):
    def __init__(self, label_temperature: float = 0.0):
        self.label_temperature = label_temperature

    @abstractmethod
    def _score(self, prompts: list[str], completions: list[str]) -> np.ndarray: ...

    def score(self, prompts, completions):
        scores = np.asarray(self._score(prompts, completions), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = bad[0]
            raise RewardError(f"gold ({type(self).__name__}) gave a non-finite reward for {bad.size} completion(s), "
                              f"first: prompt {prompts[i]!r} / completion {completions[i]!r}")
        return scores

    def prefer(self, prompts, a, b, rng):
        """Bradley-Terry labels: P(a > b) = sigmoid((r_a - r_b) / T); T = 0 means the higher score wins."""
        diff = self.score(prompts, a) - self.score(prompts, b)
        if self.label_temperature == 0:
            p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        else:
            p = 1.0 / (1.0 + np.exp(-diff / self.label_temperature))
        return (rng.random(len(diff)) < p).astype(np.float64)

    def judge(self, prompts, candidates, references):
        return np.sign(self.score(prompts, candidates) - self.score(prompts, references)) * 0.5 + 0.5


class ProgrammaticGold(ScoreGold):
    def __init__(self, cfg: dict):
        super().__init__(cfg["gold"]["label_temperature"])
        if cfg["data"]["source"] != "miniature":
            raise ConfigError("gold.type 'programmatic' is the miniature's true reward; it needs data.source: miniature")
        from rlhf.data.miniature import MiniatureSpec, true_reward
        self.spec, self._true_reward = MiniatureSpec.from_config(cfg), true_reward

    def _score(self, prompts, completions):
        return [self._true_reward(p, c, self.spec) for p, c in zip(prompts, completions)]


class RewardModelGold(ScoreGold):
    """A large sequence-classification RM; conversations through its chat template when it has one."""

    def __init__(self, cfg: dict, device: torch.device):
        super().__init__(cfg["gold"]["label_temperature"])
        from rlhf.models import load_reward_model, load_tokenizer
        g = cfg["gold"]
        self.tokenizer = load_tokenizer(g["name"], pad_token=cfg["model"]["pad_token"])
        self.model = load_reward_model(g["name"], self.tokenizer, dtype=cfg["model"]["dtype"], device=device).eval()
        self.batch_size, self.max_length, self.device = g["batch_size"], g["max_length"], device

    def _format(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return f"{prompt} {completion.strip()}{self.tokenizer.eos_token}"

    @torch.no_grad()
    def _score(self, prompts, completions):
        texts = [self._format(p, c) for p, c in zip(prompts, completions)]
        # Sorting by length keeps padding (wasted compute) small in each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = np.empty(len(texts))
        self.tokenizer.padding_side = "right"
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits[:, 0].float().cpu().numpy()
            scores[idx] = logits
        return scores


def make_gold(cfg: dict, device: torch.device | None = None) -> Gold:
    kind = cfg["gold"]["type"]
    if kind == "programmatic":
        return ProgrammaticGold(cfg)
    if kind == "reward_model":
        return RewardModelGold(cfg, device or torch.device("cpu"))
    raise ConfigError(f"gold.type {kind!r} is not implemented")
