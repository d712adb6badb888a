"""The pairwise judging prompt (AlpacaFarm style: instruction, Output (a), Output (b), pick one) and its parser.

Which response is shown as (a) is decided per pair by a hash of the pair and the seed, not by an RNG stream:
the same pair always yields the same request, so a rerun hits the cache no matter the batching or order.
"""
from __future__ import annotations

import hashlib
import re

SYSTEM = ("You are a careful evaluator of AI responses. You compare two responses to the same instruction "
          "and answer only with the label of the better one.")

USER = """Select the output, (a) or (b), that better follows the instruction. Consider helpfulness, accuracy, \
relevance and concision; the choice may be subjective. Do not let the order of the outputs or their length \
alone decide. Answer with exactly "Output (a)" or "Output (b)" and nothing else.

## Instruction:
{instruction}

## Output (a):
{output_a}

## Output (b):
{output_b}

## Which is better, Output (a) or Output (b)?"""

_LABELLED = re.compile(r"output\s*\(?\s*([ab])\s*\)?", re.IGNORECASE)
_BARE = re.compile(r"^\s*\(?\s*([ab])\s*\)?\s*[.!]?\s*$", re.IGNORECASE)


def messages(instruction: str, output_a: str, output_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(instruction=instruction.strip(), output_a=output_a.strip(),
                                                    output_b=output_b.strip())}]


def parse(content: str | None) -> str | None:
    """'a' or 'b', or None when the answer names neither or both (the caller counts it as unparseable)."""
    if not content:
        return None
    found = {m.lower() for m in _LABELLED.findall(content)}
    if len(found) == 1:
        return found.pop()
    if not found and (m := _BARE.match(content)):
        return m.group(1).lower()
    return None


def swapped(seed: int, *texts: str) -> bool:
    """Whether the first response is shown second: a fair coin, fixed by the seed and the pair's texts."""
    h = hashlib.sha256("\x1f".join([str(seed), *texts]).encode()).digest()
    return bool(h[0] & 1)
