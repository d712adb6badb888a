"""RLVR datasets (GR §5.2-5.3, App. C.4) in one row schema: the chat messages of the prompt, the question, the gold
solution the reward checks against, and a reference completion in the task's answer format.

Prompts (as in ReDit's grpo_gsm8k.py / grpo_math.py):
- GSM8K: a system message asking for the `<reasoning>...</reasoning><answer>...</answer>` format, a one-shot turn
  (user "What is the largest single-digit prime number?", assistant's answer 7), then the question.
- MATH: the problem + " Let's think step by step and output the final answer within \\boxed{}." (no system message:
  the model's chat template adds its default one).
The messages become the prompt text through the policy tokenizer's own chat template (`chat_prompt`).
"""
from __future__ import annotations

import re

from rlhf.errors import DataError
from rlhf.rewards.rules import gsm8k_gold
from rlhf.data.hub import load

GSM8K_SYSTEM = """
Respond in the following format:

<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""
GSM8K_ONE_SHOT = ("What is the largest single-digit prime number?",
                  "<reasoning>\n9 is divisble by 3 and 8 is divisible by 2, but 7 is prime.\n</reasoning>\n"
                  "<answer>\n7\n</answer>\n")  # sic: ReDit's example, typo included
MATH_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
GSM8K_COLUMNS, MATH_COLUMNS = {"question", "answer"}, {"problem", "solution", "level", "type"}
TASK_OF_SOURCE = {"arithmetic": "gsm8k", "gsm8k": "gsm8k", "math": "math"}  # data.source -> rules and prompt


def rlvr_task(cfg: dict) -> str | None:
    """"gsm8k" or "math" (which rule reward and prompt) for an RLVR experiment, None for an RLHF one."""
    return TASK_OF_SOURCE.get(cfg["data"]["source"])


def gsm8k_messages(question: str, system: str = GSM8K_SYSTEM, one_shot: bool = True) -> list[dict]:
    shot = [{"role": "user", "content": GSM8K_ONE_SHOT[0]},
            {"role": "assistant", "content": GSM8K_ONE_SHOT[1]}] if one_shot else []
    return [{"role": "system", "content": system}, *shot, {"role": "user", "content": question}]


def math_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": problem + MATH_SUFFIX}]


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text an instruct model sees: its chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the policy tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
                        "RLVR prompts are chat messages (use an instruct model)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def gsm8k_row(row: dict) -> dict:
    """`openai/gsm8k` (config main): question, answer (steps with <<calculator>> notes, then `#### N`)."""
    steps, gold = row["answer"].split("####")[0].strip(), gsm8k_gold(row["answer"])
    steps = re.sub(r"<<[^>]*>>", "", steps)
    return {"question": row["question"], "solution": row["answer"], "gold": gold,
            "reference": f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n{gold}\n</answer>"}


def math_row(row: dict) -> dict:
    """MATH (hendrycks layout): problem, solution (ends in \\boxed{}), level ("Level 3"), type ("Algebra")."""
    return {"question": row["problem"], "solution": row["solution"], "reference": row["solution"],
            "level": row["level"], "type": row["type"]}


def hub_rows(task: str, name: str, config: str | None, split: str) -> list[dict]:
    """A hub dataset's split (`datasets.load_dataset`: a hub id or a local folder in its layout) as RLVR rows."""
    ds = load(name, config, split)
    columns, mapper = (GSM8K_COLUMNS, gsm8k_row) if task == "gsm8k" else (MATH_COLUMNS, math_row)
    missing = columns - set(ds.column_names)
    if missing:
        raise DataError(f"{name} split {split!r}: the {task} task needs column(s) {', '.join(sorted(missing))}; "
                        f"found {', '.join(sorted(ds.column_names))}")
    return [mapper(r) for r in ds]


def with_prompts(rows: list[dict], task: str, tokenizer, one_shot: bool = True, system: str = GSM8K_SYSTEM) -> list[dict]:
    """Each row with `prompt`: its messages through the tokenizer's chat template."""
    make = (lambda q: gsm8k_messages(q, system, one_shot)) if task == "gsm8k" else math_messages
    return [{"prompt": chat_prompt(tokenizer, make(r["question"])), **r} for r in rows]
