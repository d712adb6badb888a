"""The LLM-judge reward of the GR paper's RLVR experiments (App. C.5): the judge's correctness score (1-5) mapped to
[0, 2] plus the rule-based format terms, through the project's OpenAI-compatible judge client (an API or a `vllm
serve` judge; every request cached by content, so a rerun or a resumed run asks nothing twice).

The map from score to reward is a setting: the paper says only "scaled to [0, 2]"; the default is linear,
(score - 1) / 2. A reply without exactly one integer correctness score in 1-5 is *unparseable*: it gets
`unparseable_reward` (default 0, as a wrong answer) and is counted, so the trainer logs how many per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import ConfigError
from rlhf.judge import rlvr
from rlhf.rewards.rules import gsm8k_format_terms

LINEAR = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class JudgeRewardSettings:
    reply_format: str = "xml"                         # xml (GR's prompt) | lines (GR's Qwen3 judges)
    correctness_map: tuple[float, ...] = LINEAR       # reward of correctness score 1, 2, 3, 4, 5
    unparseable_reward: float = 0.0
    one_shot: bool = True

    def __post_init__(self):
        if self.reply_format not in rlvr.REPLY_FORMATS:
            raise ConfigError(f"judge reward reply_format: '{self.reply_format}' is not one of {rlvr.REPLY_FORMATS}")
        if len(self.correctness_map) != 5:
            raise ConfigError(f"judge reward correctness_map: 5 rewards (scores 1-5), got {len(self.correctness_map)}")


def judge_reward_terms(reply: str | None, completion: str, settings: JudgeRewardSettings) -> tuple[dict, bool]:
    """({judge_correctness, int, strict_format, soft_format, xml_count}, whether the reply was parseable)."""
    scores = rlvr.parse_scores(reply, settings.reply_format)
    correctness = settings.unparseable_reward if scores is None else settings.correctness_map[scores[0] - 1]
    return {"judge_correctness": correctness, **gsm8k_format_terms(completion)}, scores is not None


class JudgeReward:
    """Scores completions with a judge behind `client` (rlhf.judge.client.ChatClient)."""

    def __init__(self, client, settings: JudgeRewardSettings):
        self.client, self.settings = client, settings

    def __call__(self, problems: list[str], completions: list[str], solutions: list[str]) -> tuple[list[dict], int]:
        """(terms per completion, number of unparseable replies)."""
        s = self.settings
        requests = [self.client.request(rlvr.messages(p, c, sol, s.reply_format, s.one_shot))
                    for p, c, sol in zip(problems, completions, solutions, strict=True)]
        replies = self.client.answers(requests, desc="rlvr judge")
        scored = [judge_reward_terms(r, c, s) for r, c in zip(replies, completions)]
        return [terms for terms, _ in scored], sum(not ok for _, ok in scored)
