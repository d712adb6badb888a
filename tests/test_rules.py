"""The RLVR rule rewards (rlhf/rewards/rules.py) on crafted completions; expected values worked out by hand from
ReDit's reward functions (GR App. C.5, docs/pipeline.md; and ReDit's scripts where they differ from a naive reading: MULTILINE `$`, `isdigit`)."""
import os
import threading

import pytest

from tests.conftest import REPO
from rlhf.rewards.rules import (GSM8K_TERMS, MATH_TERMS, MathVerifier, gsm8k_gold, gsm8k_reward_terms, last_boxed,
                                math_reward_terms, reasoning_steps)

GOOD = "<reasoning>\nStep one: 3 boxes.\nStep two: 3*4=12.\n</reasoning>\n<answer>\n12\n</answer>"


def terms(completion, gold="12"):
    out = gsm8k_reward_terms(completion, gold)
    assert tuple(out) == GSM8K_TERMS
    return [out[k] for k in GSM8K_TERMS]


@pytest.mark.parametrize("completion, gold, expected", [
    # correctness, int, strict, soft, xml_count
    (GOOD, "12", [2.0, 0.5, 1.0, 1.0, 0.5]),                                   # multi-line reasoning (the DOTALL bug)
    (GOOD.replace("\n12\n", "\n13\n"), "12", [0.0, 0.5, 1.0, 1.0, 0.5]),       # wrong
    (GOOD + "\n", "12", [2.0, 0.5, 1.0, 1.0, 0.499]),                          # one char after </answer>
    (GOOD + "\nExtra words", "12", [2.0, 0.5, 1.0, 1.0, 0.488]),               # MULTILINE: `$` before the newline
    (GOOD + " trailing", "12", [2.0, 0.5, 0.0, 0.0, 0.491]),                   # no newline: neither format
    ("The answer is 12.", "12", [0.0, 0.0, 0.0, 0.0, 0.0]),                    # no tags: the whole text is the answer
    ("12", "12", [2.0, 0.5, 0.0, 0.0, 0.0]),                                   # ... which can be exactly right
    ("<answer>12</answer>", "12", [2.0, 0.5, 0.0, 0.0, 0.0]),                  # missing reasoning, no newlines
    ("<reasoning>a</reasoning><answer>12</answer>", "12", [2.0, 0.5, 0.0, 1.0, 0.0]),  # soft only
    ("<reasoning>\na\n</reasoning>\n<answer>\n11\n</answer>\n<answer>\n12\n</answer>", "12",
     [2.0, 0.5, 1.0, 1.0, 0.25]),                                              # duplicated: the last answer counts
    ("<reasoning><reasoning></reasoning><answer>12</answer></answer>", "12",
     [2.0, 0.5, 0.0, 1.0, 0.0]),                                               # tag spam keeps the soft format
    ("<reasoning>\n" * 3 + "a\n</reasoning>\n<answer>\n12\n</answer>", "12",
     [2.0, 0.5, 1.0, 1.0, 0.375]),                                             # a tag three times loses its 0.125
    (GOOD.replace("\n12\n", "\n-3\n"), "-3", [2.0, 0.0, 1.0, 1.0, 0.5]),       # negative: correct, not isdigit
    (GOOD.replace("\n12\n", "\n2.5\n"), "2.5", [2.0, 0.0, 1.0, 1.0, 0.5]),     # decimal
    ("<reasoning>\n((([[[<<>>]]])))\n</reasoning>\n<answer>\n{{12}}\n</answer>", "12",
     [0.0, 0.0, 1.0, 1.0, 0.5]),                                               # bracket spam: format only
    ("", "12", [0.0, 0.0, 0.0, 0.0, 0.0]),
])
def test_gsm8k_reward_terms(completion, gold, expected):
    assert terms(completion, gold) == pytest.approx(expected)


def test_gsm8k_gold_is_the_text_after_the_hashes_without_commas_or_dollars():
    assert gsm8k_gold("She pays 2 * $600 = $1,200.\n#### $1,200") == "1200"
    assert gsm8k_gold("18 - 21 = -3\n#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final answer marker")


@pytest.mark.parametrize("text, box", [
    (r"so \boxed{3}", "3"), (r"\boxed{3} no, \boxed{5}", "5"), (r"\boxed {\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{4} then \boxed{\frac{1}{", "4"), (r"\boxed{\frac{1}{", None), ("no box", None), (r"\boxed 5", None)])
def test_last_boxed_takes_the_last_balanced_box(text, box):
    assert last_boxed(text) == box


@pytest.mark.parametrize("text, score", [
    ("Step 1: a\nStep 2: b", 2 / 3), ("First, a. Second, b. Next, c. Finally, d.", 1.0),
    ("1. a\n2. b\n3. c", 1 / 3),  # `^\d+\.` without MULTILINE: only a list at the very start counts
    ("- a\n- b\n- c\n- d", 1.0), ("plain prose", 0.0)])
def test_math_format_counts_reasoning_steps(text, score):
    assert reasoning_steps(text) == pytest.approx(score)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(workers=1, timeout=5.0)
    yield v
    v.close()


@pytest.mark.parametrize("completion, gold, correct", [
    (r"First, halve it. Finally, \boxed{0.5}", r"so the answer is $\boxed{\frac12}$", 2.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\boxed{\frac{\sqrt3}{2}}", 2.0),
    (r"\boxed{-2.5}", r"\boxed{-\frac{5}{2}}", 2.0),                 # negative, decimal vs fraction
    (r"\boxed{3} no wait \boxed{0.5}", r"\boxed{\frac{1}{2}}", 2.0),  # several boxes: the last one counts
    (r"\boxed{0.5} no wait \boxed{3}", r"\boxed{\frac{1}{2}}", 0.0),
    (r"\boxed{1}", r"first \boxed{2}, in the end \boxed{1}", 2.0),   # the gold's last box too
    (r"\boxed{\frac{1}{", r"\boxed{3}", 0.0),                        # unparseable LaTeX
    (r"\boxed{x^{2}+}", r"\boxed{3}", 0.0),
    ("Step 1: it is 3", r"\boxed{3}", 0.0),                          # no box
])
def test_math_correctness_by_math_verify(verifier, completion, gold, correct):
    out = math_reward_terms(completion, gold, verifier)
    assert tuple(out) == MATH_TERMS and out["correctness"] == correct


def test_a_math_verify_check_that_hangs_is_cut_off_in_any_thread_and_counted():
    """sympy never finishes comparing 3 with 9^(9^(9^9)); the check is killed after `timeout`, scored 0, counted,
    and the verifier keeps working (a fresh worker) — also when called from a thread other than the main one."""
    v = MathVerifier(workers=1, timeout=2.0)
    results = []
    worker = threading.Thread(target=lambda: results.append(
        v.correct([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}"], [r"\boxed{3}", r"\boxed{3}"])))
    worker.start()
    worker.join(timeout=120)
    try:
        assert not worker.is_alive() and results == [[False, True]]
        assert v.counts["timeouts"] == 1
        assert v.correct([r"\boxed{4}"], [r"\boxed{2+2}"]) == [True]
    finally:
        v.close()


SCRIPT = """
from rlhf.rewards.rules import math_reward_terms
print(math_reward_terms("First, 2 + 2 = 4. So \\\\boxed{4}", "The answer is \\\\boxed{4}")["correctness"])
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_math_reward_terms_from_a_plain_script_and_a_module_run_as_main(tmp_path, how):
    """No `if __name__ == "__main__":` guard: multiprocessing would re-run the caller's main module (a script by its
    path, `python -m x` or a notebook kernel by its name) in every math-verify worker, each of which called the reward
    again and died ("All workers expired"). The workers never import __main__ now."""
    import os
    import subprocess
    import sys
    (tmp_path / "caller.py").write_text(SCRIPT)
    argv = [sys.executable, str(tmp_path / "caller.py")] if how == "script" else [sys.executable, "-m", "caller"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert done.returncode == 0 and done.stdout.strip() == "2.0", done.stderr[-2000:]


def die_first_time(gold_box: str, pred_box: str):
    """A math-verify check whose worker dies the first time, then answers: the gold box names a marker file (a worker
    comes from the forkserver, which does not see environment variables set after it started)."""
    import os
    if not os.path.exists(gold_box):
        open(gold_box, "w").close()
        os._exit(1)
    return True, False


def always_die(gold_box: str, pred_box: str):
    import os
    os._exit(1)


def test_a_math_verify_worker_that_dies_is_replaced_once_then_reported(tmp_path):
    from rlhf.errors import RewardError
    verifier = MathVerifier(check=die_first_time)
    try:
        assert verifier.correct(["\\boxed{4}"], [f"\\boxed{{{tmp_path / 'died'}}}"]) == [False]
        assert verifier.counts["worker_restarts"] == 1 and (tmp_path / "died").exists()
    finally:
        verifier.close()
    verifier = MathVerifier(check=always_die)
    try:
        with pytest.raises(RewardError, match="worker process died twice checking '4' against '5'"):
            verifier.correct(["\\boxed{4}"], ["\\boxed{5}"])
    finally:
        verifier.close()


def parent_command(gold_box: str, pred_box: str):
    import os
    return True, open(f"/proc/{os.getppid()}/cmdline", "rb").read().replace(b"\0", b" ").decode()


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="reads the worker's parent from /proc (Linux)")
def test_math_verify_workers_fork_from_a_private_server_that_imported_math_verify_once():
    """Each worker is a fork of a forkserver that preloaded math-verify (no import per worker, nor per replacement of
    a worker killed on a timeout), and multiprocessing's global forkserver keeps its own preload (tests/conftest.py
    sets one)."""
    from multiprocessing import forkserver
    global_preload = list(forkserver._forkserver._preload_modules)
    verifier = MathVerifier(workers=2, check=parent_command)
    try:
        verifier.correct(["\\boxed{1}"], ["\\boxed{1}"])
        parent = verifier._pool.schedule(parent_command, args=("", "")).result()[1]
    finally:
        verifier.close()
    assert "multiprocessing.forkserver import main" in parent, parent
    assert "'math_verify', 'rlhf.rewards.rules'" in parent, parent
    assert forkserver._forkserver._preload_modules == global_preload
