"""Rule-based RLVR rewards of the GR paper (App. C.4), as named terms: GSM8K and MATH.

GR "follows the setup of Wei et al. (2025)" (ReDit) with Open-R1's reward terms; the values are those of
GR paper App. C.4-C.5, checked against ReDit's public scripts (grpo_gsm8k.py, grpo_math.py). Each function returns
every term by name so the trainer can log them per step; the reward is their sum.

Where the reference scripts have a quirk we keep it and say so (the published numbers were made with it):
- the format regexes run with re.DOTALL | re.MULTILINE on the stripped completion, so `$` also matches before a newline:
  `</answer>` followed by a newline and more text still counts as the strict format. DOTALL is what the widely copied
  versions lack (unsloth#1761, open-r1#237: multi-line reasoning never matched); `[\\s\\S]` here matches newlines anyway.
- `int` is `str.isdigit()`: a negative or decimal answer earns no `int` reward even when it is correct.
- xml_count: +0.125 for each of four tags occurring exactly once, minus 0.001 per character after `\\n</answer>`
  (ReDit's code subtracts (length - 1), which frees one trailing newline and pays 0.001 for none).

MATH correctness compares the last `\\boxed{}` of the completion with the last `\\boxed{}` of the gold solution by
math-verify (parse, then verify(gold, prediction): the order matters). math-verify's own timeouts use signal.alarm,
which fails outside the main thread; they are off here and MathVerifier bounds the whole check per completion by
running it in a worker process that is killed when it overruns (pebble), so a pathological LaTeX string costs at most
`timeout` seconds, in any thread.
"""
from __future__ import annotations

import atexit
import io
import logging
import os
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing import context, forkserver, popen_forkserver, reduction, spawn, util

from pebble import ProcessExpired

from rlhf.errors import RewardError

GSM8K_TERMS = ("correctness", "int", "strict_format", "soft_format", "xml_count")
MATH_TERMS = ("correctness", "format")

_FLAGS = re.DOTALL | re.MULTILINE
STRICT = re.compile(r"^<reasoning>\n[\s\S]*?\n</reasoning>\n<answer>\n[\s\S]*?</answer>$", _FLAGS)
SOFT = re.compile(r"^<reasoning>[\s\S]*?</reasoning>[\s\S]*?<answer>[\s\S]*?</answer>$", _FLAGS)
XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
# Open-R1's reasoning_steps_reward: "Step k:", a numbered list at the very start, bullets, transition words
STEPS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")


def gsm8k_gold(answer: str) -> str:
    """The gold answer of a GSM8K `answer` field: the text after `####`, with `,` and `$` removed."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer has its final answer after '####'; got {answer[-80:]!r}")
    return answer.split("####")[1].strip().replace(",", "").replace("$", "")


def xml_answer(completion: str) -> str:
    """The content of the last `<answer>` (up to the next `</answer>`), stripped; the whole text if there is none."""
    return completion.split("<answer>")[-1].split("</answer>")[0].strip()


def xml_count(completion: str) -> float:
    score = sum(0.125 for tag in XML_TAGS if completion.count(tag) == 1)
    if completion.count("\n</answer>") == 1:
        score -= 0.001 * len(completion.split("\n</answer>")[-1])
    return score


def gsm8k_reward_terms(completion: str, gold: str) -> dict[str, float]:
    """Correctness 2.0 (answer string equals the gold), int 0.5, strict and soft format 1.0 each, xml count <= 0.5."""
    answer, stripped = xml_answer(completion), completion.strip()
    return {"correctness": 2.0 if answer == gold else 0.0,
            "int": 0.5 if answer.isdigit() else 0.0,
            "strict_format": 1.0 if STRICT.match(stripped) else 0.0,
            "soft_format": 1.0 if SOFT.match(stripped) else 0.0,
            "xml_count": xml_count(completion)}


GSM8K_FORMAT_TERMS = ("int", "strict_format", "soft_format", "xml_count")


def gsm8k_format_terms(completion: str) -> dict[str, float]:
    """The GSM8K terms that need no gold (all but correctness): what the LLM-judge reward adds to the judge's score
    (GR App. C.5: "the correctness score scaled to [0, 2], along with the same formatting rewards used in the
    rule-based-reward setting")."""
    terms = gsm8k_reward_terms(completion, gold="")
    return {k: terms[k] for k in GSM8K_FORMAT_TERMS}


def reasoning_steps(completion: str) -> float:
    """MATH format reward: min(1, matches / 3) of step markers in the stripped completion."""
    return min(1.0, len(STEPS.findall(completion.strip())) / 3)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` with balanced braces, or None.

    By hand because the libraries' "last boxed" (latex2sympy2_extended's, used by math-verify's normalization) joins
    boxes that stand close together into one set answer: "\\boxed{3} no, \\boxed{5}" would be {3, 5}, not 5."""
    start = text.rfind("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)  # unclosed or brace-less: an earlier box may still be whole
    return None


def _warm() -> None:
    """A worker's initializer: math-verify imported before the first timed check. The forkserver preloads it (below),
    so in a worker this costs nothing; it matters only where the server could not import it."""

    import math_verify  # noqa: F401
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "Timeout is disabled": intended, we bound it outside


# Our own forkserver, not multiprocessing's global one (whose default preload is the caller's __main__, and which
# other libraries share). It imports math-verify and this module once; each worker is a fork of it. Measured here:
# importing math-verify costs ~0.75 s of CPU, so 8 workers on each of 8 ranks spent ~48 s at start, and every worker
# killed on a timeout cost another import before its replacement could check anything.
_SERVER = forkserver.ForkServer()
_SERVER.set_forkserver_preload(["math_verify", __name__])


class _NoMainPopen(popen_forkserver.Popen):
    """A child of _SERVER that does not run the caller's __main__: multiprocessing re-imports the parent's main module
    in every worker (to find functions defined there), so a plain script that calls math_reward_terms at top level
    would run again inside each worker, start pools there and die ("All workers expired"). The worker only needs
    this module's functions, found by import."""

    def _launch(self, process_obj):
        prep_data = {k: v for k, v in spawn.get_preparation_data(process_obj._name).items()
                     if not k.startswith("init_main")}
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = _SERVER.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)  # as multiprocessing's own: the parent's sentinel of the child
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _NoMainProcess(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _NoMainPopen(process_obj)


class _NoMainContext(context.ForkServerContext):
    """forkserver (a worker never inherits the trainer's threads, CUDA context or open files) without __main__."""
    Process = _NoMainProcess


def _check(gold_box: str, pred_box: str) -> tuple[bool, bool]:
    """(gold parsed, prediction verified) by math-verify, its signal-based timeouts off (we bound time outside)."""
    from math_verify import LatexExtractionConfig, parse, verify  # heavy (sympy): in the workers only

    # the box first; math-verify's default normalization (it repairs \frac12, \sqrt2, units, "\text{}")
    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    gold = parse(f"\\boxed{{{gold_box}}}", extraction_config=config, extraction_mode="first_match",
                 parsing_timeout=None)
    if not gold:
        return False, False
    pred = parse(f"\\boxed{{{pred_box}}}", extraction_config=config, extraction_mode="first_match",
                 parsing_timeout=None)
    return True, bool(pred) and verify(gold, pred, timeout_seconds=None)


@dataclass
class MathVerifier:
    """math-verify in `workers` worker processes, each check bounded by `timeout` seconds (the worker is killed and
    replaced when it overruns). Counts what it could not decide: timeouts, golds without a parseable last box."""
    workers: int = 1
    timeout: float = 10.0
    check: object = None  # the worker's function, (gold box, prediction box) -> (gold parsed, verified); None: _check
    counts: dict = field(default_factory=lambda: {"timeouts": 0, "gold_unparseable": 0, "no_box": 0,
                                                  "worker_restarts": 0})

    def __post_init__(self):
        self._pool, self._lock = None, threading.Lock()

    def _ensure_pool(self):
        with self._lock:
            if self._pool is None:
                from pebble import ProcessPool  # with the first MATH reward (rule_correct of GSM8K needs none)
                self._pool = ProcessPool(max_workers=self.workers, initializer=_warm, context=_NoMainContext())
            return self._pool

    def correct(self, completions: list[str], gold_solutions: list[str]) -> list[bool]:
        """Whether each completion's last box equals its gold's last box (False where undecidable, and counted)."""
        pool, out, jobs, check = self._ensure_pool(), [False] * len(completions), {}, self.check or _check
        for i, (text, gold) in enumerate(zip(completions, gold_solutions, strict=True)):
            pred_box, gold_box = last_boxed(text), last_boxed(gold)
            if gold_box is None:
                self.counts["gold_unparseable"] += 1
            elif pred_box is None:
                self.counts["no_box"] += 1
            else:
                jobs[i] = pool.schedule(check, args=(gold_box, pred_box), timeout=self.timeout)
        for i, future in jobs.items():
            for attempt in (1, 2):
                try:
                    gold_ok, out[i] = future.result()
                    self.counts["gold_unparseable"] += not gold_ok
                except FutureTimeout:
                    self.counts["timeouts"] += 1
                except ProcessExpired as e:  # the worker died (killed, out of memory): once more, then say so
                    pred_box, gold_box = last_boxed(completions[i]), last_boxed(gold_solutions[i])
                    if attempt == 2:
                        raise RewardError(f"math-verify: its worker process died twice checking {pred_box!r} against "
                                          f"{gold_box!r} ({e}): a memory limit, or an input that crashes it") from None
                    self.counts["worker_restarts"] += 1
                    future = self._ensure_pool().schedule(check, args=(gold_box, pred_box), timeout=self.timeout)
                    continue
                break
        return out

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join()
                self._pool = None


_DEFAULT: MathVerifier | None = None


def default_verifier() -> MathVerifier:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathVerifier()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def math_reward_terms(completion: str, gold_solution: str, verifier: MathVerifier | None = None) -> dict[str, float]:
    """Correctness 2.0 (last box equals the gold's last box, by math-verify) and the reasoning-steps format <= 1."""
    correct = (verifier or default_verifier()).correct([completion], [gold_solution])[0]
    return {"correctness": 2.0 if correct else 0.0, "format": reasoning_steps(completion)}
