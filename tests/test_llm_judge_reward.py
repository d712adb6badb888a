"""The RLVR LLM-judge reward (rlhf/rewards/llm_judge.py, rlhf/judge/rlvr.py): reply parsing on parseable,
unparseable and adversarial replies, the score map, and the whole path through the judge client against a real local
HTTP server (tests/fake_openai.py) with its cache."""
import re

import pytest

from rlhf.config import load_config
from rlhf.errors import ConfigError
from rlhf.judge import rlvr
from rlhf.judge.client import ChatClient
from rlhf.rewards.llm_judge import JudgeReward, JudgeRewardSettings, judge_reward_terms
from tests.conftest import write_config
from tests.fake_openai import FakeOpenAI

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"


@pytest.mark.parametrize("reply, fmt, want", [
    ("<judgement>\nRight.\n</judgement>\n<correctness_score>\n5\n</correctness_score>\n"
     "<coherence_score>\n4\n</coherence_score>", "xml", (5, 4)),
    ("<judgement>ok</judgement><correctness_score> 2 </correctness_score>", "xml", (2, None)),  # no coherence
    ("<CORRECTNESS_SCORE>3</CORRECTNESS_SCORE><coherence_score>seven</coherence_score>", "xml", (3, None)),
    ("Judgement: wrong sum.\nCorrectness_score: 1\nCoherence_score: 2", "lines", (1, 2)),
    ("Judgement: fine\ncorrectness_score : 4", "lines", (4, None)),
    # unparseable
    (None, "xml", None), ("", "xml", None), ("The answer looks right, 5/5.", "xml", None),
    ("<correctness_score>4.5</correctness_score>", "xml", None),          # not an integer
    ("<correctness_score>7</correctness_score>", "xml", None),            # out of range
    ("<correctness_score>0</correctness_score>", "xml", None),
    ("<correctness_score>5/5</correctness_score>", "xml", None),
    ("<correctness_score>5", "xml", None),                                # unclosed
    ("<correctness_score>1</correctness_score><correctness_score>5</correctness_score>", "xml", None),  # twice
    ("<correctness_score>5</correctness_score><correctness_score>5</correctness_score>", "xml", None),
    ("Correctness_score: 5", "xml", None),                                # the other format
    ("<correctness_score>5</correctness_score>", "lines", None),
    ("Correctness_score: 5\nCorrectness_score: 1", "lines", None),
])
def test_parse_scores(reply, fmt, want):
    assert rlvr.parse_scores(reply, fmt) == want


def test_reward_is_the_mapped_score_plus_the_format_terms_and_unparseable_is_flagged():
    s = JudgeRewardSettings()
    terms, ok = judge_reward_terms("<correctness_score>4</correctness_score>", GOOD, s)
    assert ok and terms == {"judge_correctness": 1.5, "int": 0.5, "strict_format": 1.0, "soft_format": 1.0,
                            "xml_count": 0.5}
    terms, ok = judge_reward_terms("I refuse.", GOOD, JudgeRewardSettings(unparseable_reward=-1.0))
    assert not ok and terms["judge_correctness"] == -1.0 and terms["strict_format"] == 1.0
    step = JudgeRewardSettings(correctness_map=(0, 0, 0, 0, 2))  # a custom map: only a 5 pays
    assert judge_reward_terms("<correctness_score>4</correctness_score>", "x", step)[0]["judge_correctness"] == 0
    with pytest.raises(ConfigError, match="correctness_map"):
        JudgeRewardSettings(correctness_map=(0, 1, 2))
    with pytest.raises(ConfigError, match="reply_format"):
        JudgeRewardSettings(reply_format="json")


def test_prompt_is_the_papers_with_a_one_shot_turn_and_the_chosen_reply_format():
    m = rlvr.messages("What is 2+2?", GOOD, "2+2=4\n#### 4")
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user"]
    assert m[0]["content"].startswith("Judge the correctness of the answer and reasoning for the given problem.")
    assert "<correctness_score>" in m[0]["content"] and rlvr.parse_scores(m[2]["content"]) == (5, 5)
    assert m[3]["content"] == ("<problem>\nWhat is 2+2?\n</problem>\n<model_answer>\n" + GOOD +
                               "\n</model_answer>\n<correct_solution>\n2+2=4\n#### 4\n</correct_solution>")
    lines = rlvr.messages("q", "a", "s", reply_format="lines", one_shot=False)
    assert len(lines) == 2 and "Correctness_score: ..." in lines[0]["content"]
    assert "<correctness_score>" not in lines[0]["content"]


def _problem_answer(body):
    user = body["messages"][-1]["content"]
    return (re.search(r"<problem>\n(.*?)\n</problem>", user, re.S)[1],
            re.search(r"<answer>\n(.*?)\n</answer>", user, re.S))


def test_judge_reward_through_the_client_caches_and_counts_unparseable(tmp_path, monkeypatch):
    """A judge that gives 5 to answer '4', 1 to other answers, and an unparseable reply where there is no <answer>:
    rewards, the unparseable count, and a second call served from the cache (no new request)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def respond(body):
        _, answer = _problem_answer(body)
        if answer is None:
            return "I cannot judge this."
        return rlvr.reply_text("ok", 5 if answer[1] == "4" else 1, 3, "xml")

    completions = [GOOD, GOOD.replace("\n4\n", "\n5\n"), "four", GOOD]
    with FakeOpenAI(respond=respond) as server:
        cfg = load_config(write_config(tmp_path, gold={"type": "openai", "judge": {
            "base_url": server.url, "timeout": 5.0, "requests_per_minute": 6000}}))
        reward = JudgeReward(ChatClient(cfg["gold"]["judge"], tmp_path / "rlvr_judge", echo=lambda *a: None),
                             JudgeRewardSettings())
        terms, unparseable = reward(["What is 2+2?"] * 4, completions, ["#### 4"] * 4)
        sent = sum(len(v) for v in server.attempts.values())
        again, _ = reward(["What is 2+2?"] * 4, completions, ["#### 4"] * 4)
        assert sum(len(v) for v in server.attempts.values()) == sent == 3  # two identical requests: one sent
    assert [t["judge_correctness"] for t in terms] == [2.0, 0.0, 0.0, 2.0] and unparseable == 1
    assert terms[2]["strict_format"] == 0.0 and again == terms
