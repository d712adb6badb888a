from rlhf.data.miniature import MiniatureSpec, corrupt, generate_splits, key_facts, true_reward
import random

SPEC = MiniatureSpec()
PROMPT = "post : grace stole the chair . oscar sold the lamp . alice bought the ring . erin sold the watch . so really honestly was . tldr :"


def test_key_facts_are_read_from_fixed_positions():
    assert key_facts(PROMPT, SPEC) == ["grace", "stole", "chair", "oscar", "sold", "lamp"]


def test_true_reward_prefers_concise_complete_summaries():
    r = lambda c: true_reward(PROMPT, c, SPEC)  # noqa: E731
    perfect = r("grace stole chair and oscar sold lamp")
    assert perfect == 1.0
    assert r("grace stole chair") < perfect                              # missing content
    assert r("grace stole chair and alice sold lamp") < perfect          # wrong (distractor) name
    assert r("grace stole chair and oscar sold lamp really") < perfect   # irrelevant filler
    assert r("grace stole chair and oscar sold lamp lamp") < perfect     # repetition
    assert r("grace stole chair and oscar sold lamp and alice bought ring") < r("grace stole chair and oscar sold lamp ring")


def test_splits_are_deterministic_and_disjoint():
    train, test = generate_splits(SPEC, 300, 50, seed=3)
    assert (train, test) == generate_splits(SPEC, 300, 50, seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert generate_splits(SPEC, 300, 50, seed=4)[0] != train


def test_references_are_imperfect_at_the_configured_rate():
    train, _ = generate_splits(SPEC, 2000, 1, seed=0)
    flawed = sum(true_reward(r["prompt"], r["reference"], SPEC) < 1.0 for r in train) / len(train)
    assert 0.4 < flawed < 0.55  # P(at least one flaw) = 0.5, some flaws (drop+insert back) cancel out
    clean, _ = generate_splits(MiniatureSpec(reference_noise=0.0), 200, 1, seed=0)
    assert all(true_reward(r["prompt"], r["reference"], SPEC) == 1.0 for r in clean)


def test_corrupt_changes_the_reference():
    words = "grace stole chair and oscar sold lamp".split()
    rng = random.Random(0)
    assert all(corrupt(words, rng, ["alice", "ring"]) != words for _ in range(50))
