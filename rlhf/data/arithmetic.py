"""The RLVR miniature: synthetic arithmetic word problems in GSM8K's shape, and the tokenizer of its tiny model.

A problem adds and subtracts a few small numbers ("Ann has 7 apples . She gets 5 more and gives 3 away . How many
apples does Ann have ?"); its solution is GSM8K-style (steps, then `#### 9`), so the GSM8K rule rewards and the judge
prompt apply unchanged. The reference completion the tiny "instruct" model is pretrained on is in the GR paper's
answer format, `<reasoning>\\n7 + 5 = 12 , 12 - 3 = 9\\n</reasoning>\\n<answer>\\n9\\n</answer>`, with two
deliberate imperfections, so that RL has something to improve and something to exploit:
- `wrong_fraction` of the references carry an arithmetic slip (the final number off by one): the pretrained model
  answers with partial accuracy;
- `hedge_fraction` of the references state the answer with a confident word before it ("<answer>\\nsurely 9\\n"),
  which the rule checker counts as wrong (the answer string is not the number) and a weak judge may like; of those,
  `hedge_repeat_fraction` open with two ("surely clearly 9");
- `bluff_fraction` of the references skip the reasoning: it is two confident words, and the answer a guess
  ("<reasoning>\nsurely clearly\n</reasoning>\n<answer>\n4\n</answer>": the rare tail that the out-of-distribution
  judge `standin-judge-r2` believes, config/rlvr-ood.yaml). A bluff costs no format reward, so a policy that learns it
  keeps the format and loses its accuracy.

The tokenizer keeps the format's whitespace exact (the rule rewards test "<reasoning>\\n" literally): chat and XML
tags, numbers and words are single tokens, every other character (space, newline, punctuation) is its own token,
and decoding concatenates (no added spaces).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf.data.rlvr import GSM8K_ONE_SHOT, GSM8K_SYSTEM

NAMES = ["Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "shells"]
HEDGES = ["surely", "clearly", "definitely"]
CHAT_ROLES = ("system", "user", "assistant")
TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
PROMPT_TEXT = GSM8K_SYSTEM + " ".join(GSM8K_ONE_SHOT)  # the GSM8K prompt's words, so the miniature uses it verbatim
WORDS = NAMES + ITEMS + HEDGES + "has She He gets more and gives away How many does have".split() + \
    re.findall(r"[A-Za-z]+", PROMPT_TEXT)
PIECES = r"<\|\w+\|>|</?\w+>|\d+|[A-Za-z]+|[\s\S]"
# A chat template in the usual shape (role markers, then the assistant's turn): the policy sees what an instruct
# model sees, and the data stage applies it with tokenizer.apply_chat_template like for a hub model.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class ArithmeticSpec:
    max_start: int = 9          # the first number: 1..max_start
    max_step: int = 5           # each later change: 1..max_step
    steps: int = 2              # changes after the first number (gets / gives)
    wrong_fraction: float = 0.3
    hedge_fraction: float = 0.05
    hedge_repeat_fraction: float = 0.0  # of the hedged references, those with two confident words
    bluff_fraction: float = 0.0  # references whose reasoning is two confident words and whose answer a guess

    @property
    def max_value(self) -> int:
        return self.max_start + self.steps * self.max_step

    def vocabulary(self) -> list[str]:
        chars = sorted(set(" \n.,?:=+-#") | set(re.sub(r"[A-Za-z0-9]|</?\w+>", "", PROMPT_TEXT)))
        return ([f"<|{r}|>" for r in CHAT_ROLES] + TAGS + [str(i) for i in range(-1, self.max_value + 2)]
                + WORDS + chars)


def problem(spec: ArithmeticSpec, rng: random.Random) -> dict:
    """One problem: question, GSM8K-style solution, the correct number, the reasoning steps."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = "She" if NAMES.index(name) % 2 == 0 else "He"
    value = rng.randint(1, spec.max_start)
    sentences, steps = [f"{name} has {value} {item} ."], []
    for _ in range(spec.steps):
        delta = rng.randint(1, spec.max_step)
        if rng.random() < 0.5 or delta > value:
            sentences.append(f"{pronoun} gets {delta} more .")
            steps.append(f"{value} + {delta} = {value + delta}")
            value += delta
        else:
            sentences.append(f"{pronoun} gives {delta} away .")
            steps.append(f"{value} - {delta} = {value - delta}")
            value -= delta
    question = " ".join(sentences) + f" How many {item} does {name} have ?"
    return {"question": question, "solution": " , ".join(steps) + f"\n#### {value}", "number": value,
            "steps": steps, **difficulty_labels(steps, value)}


def difficulty_labels(steps: list[str], value: int) -> dict:
    """MATH-style labels, so the difficulty table (GR Table 4) runs on the miniature too: type = the pattern of
    operations ("+-"), level = the answer's size ("Level 1" for 0-3 ... "Level 5" for 16 and more)."""
    return {"type": "".join("+" if " + " in s else "-" for s in steps), "level": f"Level {1 + min(4, value // 4)}"}


def completion(reasoning: str, answer: str) -> str:
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def generate(spec: ArithmeticSpec, n: int, seed: int) -> list[dict]:
    """n rows: question, solution (GSM8K style: `#### <number>`), reference (the pretraining completion, with the
    slips and hedges above), correct_reference (whether the reference's answer is right by the rule checker), type
    and level (difficulty_labels)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        p = problem(spec, rng)
        number, steps = p["number"], list(p["steps"])
        if rng.random() < spec.wrong_fraction:  # a slip in the last step carries into the answer
            number += rng.choice([-1, 1])
            steps[-1] = steps[-1].rsplit("=", 1)[0] + f"= {number}"
        answer = str(number)
        if rng.random() < spec.hedge_fraction:
            answer = f"{rng.choice(HEDGES)} {answer}"
            if spec.hedge_repeat_fraction and rng.random() < spec.hedge_repeat_fraction:  # no draw when 0: data as before
                answer = f"{rng.choice(HEDGES)} {answer}"
        reasoning = " , ".join(steps)
        if spec.bluff_fraction and rng.random() < spec.bluff_fraction:  # no draw when 0: data as before
            reasoning, answer = " ".join(rng.sample(HEDGES, 2)), str(rng.randint(0, spec.max_value))
        rows.append({"question": p["question"], "solution": p["solution"],
                     "reference": completion(reasoning, answer),
                     "correct_reference": answer == str(p["number"]), "type": p["type"], "level": p["level"]})
    return rows


def build_chat_tokenizer(words: list[str]):
    """Closed-vocabulary tokenizer for the RLVR miniature: the pieces above, exact whitespace, a chat template."""
    # transformers here, not at the top: the stand-in judge imports this module for its constants
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf.models import EOS, PAD, UNK
    vocab = {w: i for i, w in enumerate([PAD, EOS, UNK] + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  clean_up_tokenization_spaces=False)
    out.chat_template = CHAT_TEMPLATE
    return out
