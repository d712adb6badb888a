"""The RLVR training reward and the rule checker of RLVR evaluation.

`VerifiableReward` scores a step's completions like the proxy RM does in RLHF (rewards per completion), from named
terms: the task's rule terms (rlhf/rewards/rules.py) or, with `judge`, the judge's mapped correctness plus the format
terms (rlhf/rewards/llm_judge.py). It also returns each term's mean and the number of unparseable judge replies, which
the trainer logs per step. `rule_correct` is what evaluation counts as solved, whatever the training reward was, so
a policy that hacks the judge shows up as falling accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.data.rlvr import rlvr_task
from rlhf.errors import DataError
from rlhf.judge.client import ChatClient
from rlhf.judge.standin import StandInJudgeServer
from rlhf.rewards.llm_judge import JudgeReward
from rlhf.rewards.rules import MathVerifier, gsm8k_gold, gsm8k_reward_terms, math_reward_terms, xml_answer
from rlhf.settings import RLVRSettings

TASKS = ("gsm8k", "math")


def gold_answer(task: str, solution: str) -> str:
    """What a completion is checked against: GSM8K the number after ####, MATH the whole solution (its last box)."""
    return gsm8k_gold(solution) if task == "gsm8k" else solution


def rule_terms(task: str, completion: str, solution: str, verifier: MathVerifier | None = None) -> dict[str, float]:
    if task == "gsm8k":
        return gsm8k_reward_terms(completion, gsm8k_gold(solution))
    return math_reward_terms(completion, solution, verifier)


def rule_correct(task: str, completions: list[str], solutions: list[str],
                 verifier: MathVerifier | None = None) -> list[bool]:
    """Solved by the rule checker: GSM8K the <answer> string equals the gold, MATH the last box verifies."""
    if task == "gsm8k":
        return [xml_answer(c) == gsm8k_gold(s) for c, s in zip(completions, solutions, strict=True)]
    return (verifier or MathVerifier()).correct(completions, solutions)


@dataclass
class StepRewards:
    rewards: torch.Tensor           # [N] float32: the sum of the terms
    terms: dict[str, float]         # each term's mean over the N completions
    unparseable: int = 0            # judge replies without a usable score
    features: None = None           # no RM features: SignCert-PO does not apply to verifiable rewards


@dataclass
class VerifiableReward:
    task: str
    rows: dict[str, dict]           # prompt -> its data row (question, solution)
    judge: JudgeReward | None = None
    verifier: MathVerifier | None = None
    server: StandInJudgeServer | None = None  # the stand-in judge this reward serves while it lives (close())

    @classmethod
    def from_rows(cls, task: str, rows: list[dict], **kwargs) -> "VerifiableReward":
        if task not in TASKS:
            raise DataError(f"unknown RLVR task {task!r} (have: {', '.join(TASKS)})")
        return cls(task, {r["prompt"]: r for r in rows}, **kwargs)

    def for_rows(self, rows: list[dict]) -> "VerifiableReward":
        """The same reward (judge client and cache, verifier) on other questions, e.g. the held-out ones."""
        return VerifiableReward.from_rows(self.task, rows, judge=self.judge, verifier=self.verifier)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> "VerifiableReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, prompts: list[str], completions: list[str]) -> StepRewards:
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise DataError(f"{len(missing)} prompt(s) have no solution in the training data, e.g. {missing[0][:80]!r}")
        rows = [self.rows[p] for p in prompts]
        unparseable = 0
        if self.judge is not None:
            per, unparseable = self.judge([r["question"] for r in rows], completions, [r["solution"] for r in rows])
        else:
            per = [rule_terms(self.task, c, r["solution"], self.verifier) for c, r in zip(completions, rows)]
        names = list(per[0])
        rewards = torch.tensor([sum(t.values()) for t in per], dtype=torch.float32)
        return StepRewards(rewards, {k: sum(t[k] for t in per) / len(per) for k in names}, unparseable)


def verifiable_reward(cfg: dict, rows: list[dict]) -> VerifiableReward:
    """An RLVR experiment's reward over these rows (rlvr.reward: rule terms, or the judge's through its cached client;
    with rlvr.judge.standin, the stand-in judge served on loopback until close()). The judge's answers go to the
    experiment's judge cache (gold.judge.cache, shared by concurrent jobs like the labeling judge's)."""
    s, task, server, judge = RLVRSettings.of(cfg), rlvr_task(cfg), None, None
    verifier = MathVerifier(s.math_verify_workers, s.math_verify_timeout) if task == "math" else None
    if s.reward == "judge":
        client_cfg = dict(cfg["gold"]["judge"])
        if s.judge["standin"]:
            server = StandInJudgeServer().start()  # until the reward's close()
            client_cfg["base_url"] = server.url
        judge = JudgeReward(ChatClient(client_cfg, client_cfg["cache"]), s.judge_reward())
    return VerifiableReward.from_rows(task, rows, judge=judge, verifier=verifier, server=server)


def load_verifiable_reward(ctx) -> VerifiableReward:
    """rlhf/rewards/kinds.py's loader: the reward over the training rows' solutions."""
    return verifiable_reward(ctx.cfg, ctx.rows)
