"""The gold: the preference oracle that labels pairs and judges win rates.

Backends: `programmatic` (the miniature's true reward), `reward_model` (any HF sequence-classification
model, e.g. Skywork-Reward-Llama-3.1-8B-v0.2) and `openai` (a pairwise LLM judge such as GPT-4.1-nano behind
any OpenAI-compatible API). Score-based golds get `prefer` and `judge` from `score`; the judge implements them
directly and has no `score`.

Pairwise outcomes may be NaN: the judge's answer could not be parsed. Callers count those explicitly
(labels drop the pair, win rates exclude it and report how many); nothing defaults silently.
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch

from rlhf.data.miniature import MiniatureSpec, true_reward
from rlhf.errors import ConfigError, RewardError
from rlhf.judge import prompt as jp
from rlhf.judge.client import ChatClient
from rlhf.models import load_reward_model, load_tokenizer


class Gold(ABC):
    """prefer: 1.0 where a is preferred to b, else 0.0. judge: 1 win, 0.5 tie, 0 loss of candidate vs reference.
    Either may hold NaN for a pair the gold could not decide (an unparseable judge answer)."""

    @abstractmethod
    def prefer(self, prompts: list[str], a: list[str], b: list[str], rng: np.random.Generator) -> np.ndarray: ...

    @abstractmethod
    def judge(self, prompts: list[str], candidates: list[str], references: list[str]) -> np.ndarray: ...

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray | None:
        """Scalar gold reward where the gold has one (None for pairwise-only judges)."""
        return None

    # The stages call these: each text goes to the gold once (an 8B gold RM is the pipeline's largest cost).
    def label(self, prompts, a, b, rng) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """prefer(a over b) and, for a score gold, the scores of a and b."""
        return self.prefer(prompts, a, b, rng), None, None

    def judge_scored(self, prompts, candidates, references) -> tuple[np.ndarray, np.ndarray | None]:
        """judge(candidate vs reference) and, for a score gold, the candidates' scores."""
        return self.judge(prompts, candidates, references), None


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

    def label(self, prompts, a, b, rng):
        """Bradley-Terry labels: P(a > b) = sigmoid((r_a - r_b) / T); T = 0 means the higher score wins."""
        score_a, score_b = self.score(prompts, a), self.score(prompts, b)
        diff = score_a - score_b
        if self.label_temperature == 0:
            p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        else:
            p = 1.0 / (1.0 + np.exp(-diff / self.label_temperature))
        return (rng.random(len(diff)) < p).astype(np.float64), score_a, score_b

    def prefer(self, prompts, a, b, rng):
        return self.label(prompts, a, b, rng)[0]

    def judge_scored(self, prompts, candidates, references):
        score = self.score(prompts, candidates)
        return np.sign(score - self.score(prompts, references)) * 0.5 + 0.5, score

    def judge(self, prompts, candidates, references):
        return self.judge_scored(prompts, candidates, references)[0]


class ProgrammaticGold(ScoreGold):
    def __init__(self, cfg: dict):
        super().__init__(cfg["gold"]["label_temperature"])
        if cfg["data"]["source"] != "miniature":
            raise ConfigError("gold.type 'programmatic' is the miniature's true reward; it needs data.source: miniature")
        self.spec, self._true_reward = MiniatureSpec.from_config(cfg), true_reward

    def _score(self, prompts, completions):
        return [self._true_reward(p, c, self.spec) for p, c in zip(prompts, completions)]


def reward_model_text(tokenizer, prompt: str, completion: str) -> str:
    """What a gold RM scores: the conversation through its chat template when it has one (special tokens in the
    text: it is encoded with add_special_tokens=False), else prompt, completion and EOS."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
    return f"{prompt} {completion.strip()}{tokenizer.eos_token}"


class RewardModelGold(ScoreGold):
    """A large sequence-classification RM; conversations through its chat template when it has one."""

    def __init__(self, cfg: dict, device: torch.device):
        super().__init__(cfg["gold"]["label_temperature"])
        g = cfg["gold"]
        self.tokenizer = load_tokenizer(g["name"], pad_token=cfg["model"]["pad_token"])
        # An 8B RM in bf16 is 16 GB: device_map 'auto' spreads its layers over every visible GPU, which is right for
        # a one-process job (label, evaluate) and wrong inside a data-parallel job (rank 0's periodic evaluations in
        # GRPO): there every GPU of the node is another rank's, so the gold stays on this rank's own device.
        device_map = g["device_map"] if int(os.environ.get("WORLD_SIZE", "1")) == 1 else None
        self.model = load_reward_model(g["name"], self.tokenizer, dtype=cfg["model"]["dtype"], device=device,
                                       device_map=device_map).eval()
        self.device = self.model.device if device_map else device
        self.batch_size, self.max_length = g["batch_size"], g["max_length"]

    @torch.no_grad()
    def _score(self, prompts, completions):
        texts = [reward_model_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
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


class JudgeGold(Gold):
    """A pairwise LLM judge (GPT-4.1-nano in the papers) through the cached, rate-limited ChatClient.

    The order of the two responses is a per-pair coin fixed by a hash (prompt.swapped), so reruns send
    identical requests and hit the cache. `both_orders` judges each evaluation pair in both orders and
    averages the parseable verdicts (0.5 where they disagree).
    """

    def __init__(self, cfg: dict):
        self.cfg, self.seed = cfg["gold"]["judge"], cfg["seed"]
        if self.cfg.get("cache") is None:  # stages get the experiment's default (rlhf.registry.side_view)
            raise ConfigError("gold.judge.cache: the judge needs its answer cache file (every paid answer is kept)")
        self.client = ChatClient(self.cfg, self.cfg["cache"])

    def _first_wins(self, prompts, first, second, flip: bool, desc: str) -> np.ndarray:
        shown_swapped = [jp.swapped(self.seed, p, x, y) != flip for p, x, y in zip(prompts, first, second)]
        requests = [self.client.request(jp.messages(p, y, x) if s else jp.messages(p, x, y))
                    for p, x, y, s in zip(prompts, first, second, shown_swapped)]
        picks = [jp.parse(c) for c in self.client.answers(requests, desc=desc)]
        return np.array([np.nan if pick is None else float((pick == "a") != s)
                         for pick, s in zip(picks, shown_swapped)])

    def prefer(self, prompts, a, b, rng):
        return self._first_wins(prompts, a, b, flip=False, desc="judge labels")

    def judge(self, prompts, candidates, references):
        outcome = self._first_wins(prompts, candidates, references, flip=False, desc="judge win rate")
        if not self.cfg["both_orders"]:
            return outcome
        other = self._first_wins(prompts, candidates, references, flip=True, desc="judge win rate (swapped)")
        with warnings.catch_warnings():  # nanmean of two NaNs is NaN (unparseable both ways), not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack([outcome, other]), axis=0)


def make_gold(cfg: dict, device: torch.device | None = None) -> Gold:
    kind = cfg["gold"]["type"]
    if kind == "programmatic":
        return ProgrammaticGold(cfg)
    if kind == "reward_model":
        return RewardModelGold(cfg, device or torch.device("cpu"))
    if kind == "openai":
        return JudgeGold(cfg)
    raise ConfigError(f"gold.type {kind!r} is not implemented")
