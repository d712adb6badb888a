import json

import pytest

from rlhf.data.miniature import MiniatureSpec, corrupt, generate_splits, is_exploit, key_facts, true_reward
from rlhf.errors import ConfigError
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


# The out-of-distribution variant (config/miniature-ood.yaml): marks up to emphasis_max in references, liked up to
# emphasis_liked by the true reward, penalized beyond; the default task is left exactly as it was.
OOD = MiniatureSpec(emphasis_max=6, emphasis_liked=8)


def test_the_default_task_has_no_marks():
    assert "!" not in SPEC.vocabulary() and "!" in OOD.vocabulary()
    assert generate_splits(SPEC, 50, 5, seed=0) == generate_splits(MiniatureSpec(emphasis_max=0), 50, 5, seed=0)
    assert not is_exploit("grace stole chair " + "! " * 12, SPEC)


def test_references_carry_every_mark_count_up_to_the_maximum_and_never_more():
    train, _ = generate_splits(OOD, 1000, 1, seed=0)
    counts = {r["reference"].split().count("!") for r in train}
    assert counts == set(range(7))
    assert all(r["reference"].split()[-1] == "!" or "!" not in r["reference"] for r in train)   # marks end it


def test_the_true_reward_likes_marks_up_to_the_limit_and_penalizes_shouting():
    summary = "grace stole chair and oscar sold lamp"
    r = [true_reward(PROMPT, summary + " !" * k, OOD) for k in range(14)]
    assert r[0] == 1.0 and r[8] == pytest.approx(1.8)                        # +0.1 per liked mark
    assert all(b > a for a, b in zip(r[:8], r[1:9]))
    assert all(b < a for a, b in zip(r[8:], r[9:]))                          # -0.5 per mark beyond
    assert r[11] < r[0] < r[8]                                               # 3 too many: below no marks at all
    assert [is_exploit(summary + " !" * k, OOD) for k in (8, 9)] == [False, True]


def test_emphasis_settings_are_checked():
    cfg = {"data": {"miniature": {"emphasis_max": 6, "emphasis_liked": 4}}}
    with pytest.raises(ConfigError, match="emphasis_liked"):
        MiniatureSpec.from_config(cfg)
    assert MiniatureSpec.from_config({"data": {"miniature": {"emphasis_max": 3}}}).emphasis_liked == 3


def _summary(proxy, gold, pi0_marks, share=0.0, pairs_max=6, liked=8):
    return {"pi0_marks": pi0_marks, "pi0_exploit_share": share, "pairs_max_marks": pairs_max, "emphasis_liked": liked,
            "by_k": [{"k": k, "proxy": p, "gold": g} for k, (p, g) in enumerate(zip(proxy, gold))]}


def test_the_design_checks_accept_an_exploit_only_extrapolation_rewards():
    """The OOD design's conditions (rlhf/experiments/ood_design.checks) on crafted summaries: the shape design 5
    measured (proxy rising past every count it saw, gold falling past 8) passes; a proxy that is pessimistic off its
    data, a pi_0 that already writes the exploit, or a gold that does not fall there each fail their own check."""
    from rlhf.experiments.ood_design import checks
    rising = [1.0 + 0.1 * k for k in range(13)]                  # the proxy's best: 12 marks
    gold = [1.0 + 0.1 * min(k, 8) - 0.5 * max(0, k - 8) for k in range(13)]
    usual = {3: 40, 4: 50, 6: 10}
    ok = checks(_summary(rising, gold, usual))
    assert ok == {"proxy_best_k": 12, "pi0_usual_k": 4, "rare": True, "over_rewarded": True, "penalized": True}
    pessimistic = [1.0 + 0.1 * min(k, 6) - 0.2 * max(0, k - 6) for k in range(13)]  # best at 6: inside its data
    assert not checks(_summary(pessimistic, gold, usual))["over_rewarded"]
    assert not checks(_summary(rising, gold, usual, share=0.05))["rare"]
    assert not checks(_summary(rising, [1.0] * 13, usual))["penalized"]
    assert not checks(_summary(rising, gold, usual, pairs_max=12))["over_rewarded"]  # the proxy saw 12 marks


def test_the_design_tool_exits_non_zero_naming_the_failed_conditions(tmp_path, monkeypatch, capsys):
    from rlhf.experiments import ood_design
    from tests.conftest import write_config
    cfg = write_config(tmp_path, "miniature-ood.yaml")
    usual = {4: 90, 6: 10}
    rising = [1.0 + 0.1 * k for k in range(13)]
    for gold, code in (([1.0 + 0.1 * min(k, 8) - 0.5 * max(0, k - 8) for k in range(13)], 0), ([1.0] * 13, 1)):
        summary = _summary(rising, gold, usual)
        monkeypatch.setattr(ood_design, "design", lambda *a, summary=summary: {**summary, **ood_design.checks(summary)})
        assert ood_design.main(["--config", str(cfg)]) == code
    err = capsys.readouterr().err
    assert "design checks failed: penalized" in err and "rare" not in err
    assert (tmp_path / "results" / "miniature-ood" / "design" / "design.json").is_file()


@pytest.mark.task
def test_the_ood_task_as_trained_meets_its_design(tmp_path):
    """The out-of-distribution miniature itself (config/miniature-ood.yaml, unchanged but for where results go): its
    data, SFT policy and proxy RM built by the Snakefile, then the design checks on them (rlhf/experiments/ood_design):
    the exploit is rare under pi_0, over-rewarded by the proxy beyond every mark count of its training pairs, and
    penalized by the gold. ~3 CPU-min: `make test-tasks`, not `make test` (CI's 15-minute budget)."""
    from rlhf.experiments import ood_design
    from tests.conftest import snakemake, write_config
    from rlhf.config import load_config
    from rlhf.paths import Paths
    cfg = write_config(tmp_path, "miniature-ood.yaml")
    built = snakemake(cfg, "--printshellcmds", str(Paths.from_config(load_config(cfg)).rm))  # a flag ends --configfile
    assert built.returncode == 0, built.stderr[-3000:]
    assert ood_design.main(["--config", str(cfg)]) == 0
    out = json.loads((tmp_path / "results" / "miniature-ood" / "design" / "design.json").read_text())
    assert out["pi0_exploit_share"] <= ood_design.RARE and out["proxy_best_k"] > out["pairs_max_marks"]
