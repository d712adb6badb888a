"""The RLVR judge prompt of the GR paper (App. C.5) and the parser of its replies.

The instruction text is the paper's, verbatim. "We additionally use 1-shot prompting with a correct example": the
example is not published; ONE_SHOT below is ours (a correct GSM8K-style answer and the reply we expect), shown as a
previous user/assistant turn. Two reply formats: the paper's XML tags, and `Judgement: / Correctness_score: /
Coherence_score:` lines, which the paper used for Qwen3 judges ("we found Qwen3 to perform better with this format").
"""
from __future__ import annotations

import re

REPLY_FORMATS = ("xml", "lines")

INSTRUCTION = """Judge the correctness of the answer and reasoning for the given problem.
The format is as follows:

```
<problem>
...
</problem>
<model_answer>
<reasoning>
...
</reasoning>
<answer>
...
</answer>
</model_answer>
<correct_solution>
...
</correct_solution>
```

You will reply with the following {reply_name} format:

```
{reply_template}
```

The `model_answer` may contain mistakes in the reasoning, the final answer, and in the format.

Give a one sentence judgement on the `model_answer`, then you will give scores from 1 to 5 for correctness and for \
coherence of the reasoning trace."""

TEMPLATES = {
    "xml": ("XML", "<judgement>\n...\n</judgement>\n<correctness_score>\n...\n</correctness_score>\n"
                   "<coherence_score>\n...\n</coherence_score>"),
    "lines": ("plain-text", "Judgement: ...\nCorrectness_score: ...\nCoherence_score: ..."),
}

ONE_SHOT = {
    "problem": "A baker makes 3 trays of 12 rolls and sells 30 of them. How many rolls are left?",
    "answer": "<reasoning>\n3 trays of 12 rolls are 3 * 12 = 36 rolls. After selling 30, 36 - 30 = 6 are left.\n"
              "</reasoning>\n<answer>\n6\n</answer>",
    "solution": "3 * 12 = 36 rolls; 36 - 30 = 6.\n#### 6",
    "judgement": "The reasoning computes the total and the remainder correctly and the final answer 6 is right.",
    "scores": (5, 5),
}


def user_message(problem: str, model_answer: str, solution: str) -> str:
    return (f"<problem>\n{problem.strip()}\n</problem>\n<model_answer>\n{model_answer.strip()}\n</model_answer>\n"
            f"<correct_solution>\n{solution.strip()}\n</correct_solution>")


def reply_text(judgement: str, correctness: int, coherence: int, reply_format: str) -> str:
    """A reply in the given format (the one-shot turn; the stand-in judge of the miniature)."""
    if reply_format == "xml":
        return (f"<judgement>\n{judgement}\n</judgement>\n<correctness_score>\n{correctness}\n</correctness_score>\n"
                f"<coherence_score>\n{coherence}\n</coherence_score>")
    return f"Judgement: {judgement}\nCorrectness_score: {correctness}\nCoherence_score: {coherence}"


def messages(problem: str, model_answer: str, solution: str, reply_format: str = "xml",
             one_shot: bool = True) -> list[dict]:
    name, template = TEMPLATES[reply_format]
    out = [{"role": "system", "content": INSTRUCTION.format(reply_name=name, reply_template=template)}]
    if one_shot:
        ex = ONE_SHOT
        out += [{"role": "user", "content": user_message(ex["problem"], ex["answer"], ex["solution"])},
                {"role": "assistant", "content": reply_text(ex["judgement"], *ex["scores"], reply_format)}]
    return out + [{"role": "user", "content": user_message(problem, model_answer, solution)}]


_SCORE = {"xml": r"<{name}>\s*(.*?)\s*</{name}>", "lines": r"^\s*{name}\s*:\s*(.*?)\s*$"}


def _field(reply: str, name: str, reply_format: str) -> str | None:
    pattern = _SCORE[reply_format].format(name=name)
    found = re.findall(pattern, reply, flags=re.IGNORECASE | re.DOTALL | re.MULTILINE)
    return found[0] if len(found) == 1 else None  # absent or given twice (possibly different): no score


def parse_scores(reply: str | None, reply_format: str = "xml") -> tuple[int, int | None] | None:
    """(correctness, coherence) as integers 1-5, or None when the correctness score is missing, repeated, not an
    integer or out of range (the caller counts these and gives the configured reward). A bad coherence score is
    None: coherence is logged, never rewarded."""
    if not reply:
        return None

    def score(name):
        text = _field(reply, name, reply_format)
        return int(text) if text is not None and re.fullmatch(r"[1-5]", text) else None
    correctness = score("correctness_score")
    return None if correctness is None else (correctness, score("coherence_score"))
