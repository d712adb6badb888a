"""The pre-registered claims file and its verdict rule (rlhf/claims.py)."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from rlhf.claims import TASKS, decide, judge, load_claims, sides, verdict_table, verdict_table_by_claim
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_claims_file_is_complete():
    claims = load_claims(REPO / "config" / "claims.yaml")
    assert len(claims) >= 20 and len({c.id for c in claims}) == len(claims)
    assert {t for c in claims for t in c.tasks} == set(TASKS)
    assert not any(c.added_after_results for c in claims)


def test_a_clear_difference_passes_and_its_reverse_fails():
    high, low = [0.55, 0.56, 0.54, 0.57, 0.55], [0.30, 0.25, 0.33, 0.28, 0.31]
    v = decide(high, low, predicted="greater", threshold=0.0)
    assert v.verdict == "pass" and v.effect == pytest.approx(0.26) and v.low > 0 and (v.n_a, v.n_b) == (5, 5)
    assert decide(low, high, predicted="greater", threshold=0.0).verdict == "fail"
    assert decide(low, high, predicted="less", threshold=0.0).verdict == "pass"


def test_an_interval_that_contains_the_threshold_is_inconclusive():
    v = decide([0.5, 0.3, 0.6, 0.2, 0.4], [0.45, 0.35, 0.4, 0.5, 0.3], predicted="greater", threshold=0.0)
    assert v.verdict == "inconclusive" and v.low < 0 < v.high


def test_the_interval_is_welchs():
    from scipy import stats
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.5, 0.2, 0.1, 0.3]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    v = decide(a, b, predicted="greater", threshold=0.0)
    assert (v.low, v.high) == pytest.approx((ref.low, ref.high))


def test_one_sample_claims_compare_the_mean_with_the_threshold():
    drops = [0.25, 0.31, 0.22, 0.40, 0.28]
    assert decide(drops, predicted="greater", threshold=0.10).verdict == "pass"
    assert decide(drops, predicted="greater", threshold=0.50).verdict == "fail"
    assert decide([0.05, 0.3, -0.1, 0.2], predicted="greater", threshold=0.10).verdict == "inconclusive"


def test_too_few_seeds_are_inconclusive_not_an_error():
    v = decide([0.5], [0.1, 0.2], predicted="greater", threshold=0.0)
    assert v.verdict == "inconclusive" and math.isnan(v.low)
    assert decide([0.5, math.nan], predicted="greater", threshold=0.0).n_a == 1


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("metric"), "claim x: missing metric"),
    (lambda c: c.update(extra=1), "claim x: unknown extra"),
    (lambda c: c.update(tasks=["nope"]), "claim x: tasks: unknown nope"),
    (lambda c: c.update(predicted="bigger"), "claim x: predicted must be one of greater, less"),
    (lambda c: c.update(threshold="0.1"), "claim x: threshold must be a number"),
    (lambda c: c.update(comparison="kl minus noreg"), "claim x: comparison: expected 'A' or 'A - B'"),
    (lambda c: c.update(comparison="kl - noreg - gr"), "claim x: comparison: expected"),
])
def test_a_bad_claim_names_itself_and_the_field(tmp_path, change, message):
    claim = {"id": "x", "paper": "GR", "source": "s", "statement": "t", "tasks": ["miniature"], "metric": "win_rate",
             "comparison": "kl - noreg", "predicted": "greater", "threshold": 0.0}
    change(claim)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [claim]}))
    with pytest.raises(ConfigError, match=message):
        load_claims(path)


def test_comparisons_name_methods_extra_runs_and_completion_groups():
    assert sides("kl - noreg") == ("kl", "noreg")
    assert sides("noreg") == ("noreg", None)
    assert sides("signcert@signcert_quantile=0.4 - signcert@signcert_quantile=0.1") == (
        "signcert@signcert_quantile=0.4", "signcert@signcert_quantile=0.1")
    assert sides("exploit - other") == ("exploit", "other")
    for bad in ("kl-noreg - ", "kl @x=1", "- noreg", "kl - noreg - gr"):
        with pytest.raises(ValueError):
            sides(bad)


def test_a_claim_is_judged_on_its_sides_values_and_tabled_whatever_its_verdict():
    claims = {c.id: c for c in load_claims(REPO / "config" / "claims.yaml")}
    kl, drop = claims["kl-above-noreg"], claims["noreg-overoptimizes"]
    values = {"kl": [0.55, 0.56, 0.54, 0.57, 0.55], "noreg": [0.30, 0.25, 0.33, 0.28, 0.31]}
    v = judge(kl, values)
    assert v == decide(values["kl"], values["noreg"], predicted="greater", threshold=0.0) and v.verdict == "pass"
    small = judge(drop, {"noreg": [0.02, 0.05, -0.01, 0.03, 0.04]})   # one-sample: the drop stays below 0.10
    assert small.verdict == "fail" and small.n_b == 0
    with pytest.raises(KeyError, match="claim kl-above-noreg: no values of win_rate for noreg"):
        judge(kl, {"kl": values["kl"]})
    table = verdict_table([(kl, "miniature", v), (drop, "miniature-ood", small)])
    assert table.startswith("2 claim-task pairs tested")
    assert "| kl-above-noreg | GR | miniature | kl - noreg | 5 vs 5 | +0.260 |" in table and "**pass**" in table
    assert "| noreg-overoptimizes | GR | miniature-ood | noreg | 5 | +0.026 |" in table and "**fail**" in table
    wide = verdict_table_by_claim([(kl, "miniature", v), (drop, "miniature-ood", small), (kl, "miniature-ood", v)])
    assert wide.startswith("3 claim-task pairs tested")
    assert "| claim | paper | comparison | predicted | miniature | miniature-ood |" in wide
    assert "| kl-above-noreg | GR | kl - noreg | > 0 | +0.260 [" in wide and wide.count("**pass** (5 vs 5)") == 2
    assert "| noreg-overoptimizes | GR | noreg | > 0.1 | - | +0.026 [" in wide and "**fail** (5) |" in wide


def test_a_claims_values_are_read_per_seed_from_its_runs(tmp_path):
    """win_rate from the evaluate stage, proxy_reward_gain and the on-policy accuracy from the GRPO metrics log; a side
    with a setting names the config's method with those settings; what is missing says what."""
    from rlhf.claims import claim_values
    from rlhf.io import write_json, write_jsonl
    from rlhf.paths import Paths
    cfg = {"results_dir": str(tmp_path), "experiment": "t", "seeds": [0, 1],
           "methods": {"noreg": {}, "kl": {"kl_beta": 0.1}, "kl-small": {"kl_beta": 0.01},
                       "signcert": {"signcert_quantile": 0.4, "kl_beta": 0.01}}}
    P = Paths.from_config(cfg)
    for i, method in enumerate(cfg["methods"]):
        for seed in cfg["seeds"]:
            write_json(P.evaluation(method, seed) / "metrics.json", {"win_rate": 0.1 * i + 0.01 * seed})
            write_jsonl(P.grpo_metrics(method, seed), [
                {"step": 2, "eval/proxy_reward": 1.5 + seed, "onpolicy/rm_accuracy": 0.6},
                {"step": 1, "loss": 0.3},
                {"step": 0, "eval/proxy_reward": 1.0, "onpolicy/rm_accuracy": 0.8}])
    claims = {c.id: c for c in load_claims(REPO / "config" / "claims.yaml")}
    assert claim_values(cfg, claims["kl-above-noreg"]) == {"kl": [0.1, 0.11], "noreg": [0.0, 0.01]}
    assert claim_values(cfg, claims["noreg-proxy-rises"]) == {"noreg": [0.5, 1.5]}
    acc = claim_values(cfg, claims["signcert-keeps-proxy-accurate"])   # signcert - kl@kl_beta=0.01
    assert acc == {"signcert": [0.6, 0.6], "kl@kl_beta=0.01": [0.6, 0.6]}
    mean = dataclasses.replace(claims["larger-q-keeps-proxy-accurate"], comparison="signcert")
    assert claim_values(cfg, mean) == {"signcert": [0.7, 0.7]}   # the mean over the run's evaluations
    with pytest.raises(KeyError, match="no method of the config has signcert's settings with signcert_quantile=0.1"):
        claim_values(cfg, claims["larger-q-keeps-proxy-accurate"])
    with pytest.raises(KeyError, match="no eval/validation_win_rate"):
        claim_values(cfg, claims["noreg-overoptimizes"])
    for seed in cfg["seeds"]:     # the validation peak at step 2 (the earlier of a tie with 6)
        write_jsonl(P.grpo_metrics("noreg", seed), [
            {"step": s, "eval/win_rate": w, "eval/validation_win_rate": v}
            for s, w, v in [(0, 0.5, 0.4), (2, 0.7, 0.8), (4, 0.6, 0.5), (6, 0.65, 0.8), (8, 0.2 + seed / 10, 0.1)]])
    assert claim_values(cfg, claims["noreg-overoptimizes"]) == {"noreg": pytest.approx([0.5, 0.4])}  # 0.7 - final
    with pytest.raises(KeyError, match="mechanisms/summary.json is missing"):
        claim_values(cfg, claims["signcert-flips-exploits"])
    # the mechanism claims read the mechanisms stage's summary: one value per seed and side (NaN: no completion there)
    write_json(P.mechanisms / "summary.json", {"seeds": {
        "0": {"signcert/rho_negative/exploit": 0.9, "signcert/rho_negative/other": 0.1, "bspo/exploit_share": 0.7},
        "1": {"signcert/rho_negative/exploit": 0.8, "signcert/rho_negative/other": 0.2, "bspo/exploit_share": None}}})
    assert claim_values(cfg, claims["signcert-flips-exploits"]) == {"exploit": [0.9, 0.8], "other": [0.1, 0.2]}
    share = claim_values(cfg, claims["bspo-fires-on-exploits"])["bspo"]
    assert share[0] == 0.7 and math.isnan(share[1])
    with pytest.raises(KeyError, match="has no side 'kl'"):
        claim_values(cfg, dataclasses.replace(claims["signcert-flips-exploits"], comparison="kl - other"))
    del cfg["methods"]["kl"]
    with pytest.raises(KeyError, match="no method 'kl'"):
        claim_values(cfg, claims["kl-above-noreg"])


def test_tuning_selects_each_sweeps_best_final_validation_win_rate_smallest_on_a_tie(tmp_path, capsys):
    """The protocol's selection through the CLI on crafted runs: the mean over the tuning seeds of the LAST
    evaluation's validation win rate (not the peak, not the test prompts'), ties to the earlier grid point; the
    targets are every sweep point's runs for the config's seeds; the shipped tuning config loads and has 4 points per
    sweep."""
    from rlhf.claims import main, tuning_runs
    from rlhf.config import load_config, sweep_points
    from rlhf.io import write_jsonl
    from rlhf.paths import Paths
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "config" / "micro.yaml"), "results_dir": str(tmp_path / "results"), "seeds": [100, 101],
        "sweeps": {"kl": {"grid": {"kl_beta": [0.1, 0.3]}}, "gr": {"grid": {"gr_gamma": [1.0, 2.0]}}}},
        sort_keys=False))
    cfg = load_config(config)
    P = Paths.from_config(cfg)
    final = {("kl-0.1", 100): 0.5, ("kl-0.1", 101): 0.7, ("kl-0.3", 100): 0.65, ("kl-0.3", 101): 0.65,
             ("gr-1", 100): 0.4, ("gr-1", 101): 0.6, ("gr-2", 100): 0.55, ("gr-2", 101): 0.45}
    for (method, seed), v in final.items():
        write_jsonl(P.grpo_metrics(method, seed), [
            {"step": 0, "eval/validation_win_rate": 0.5, "eval/win_rate": 0.5},
            {"step": 5, "eval/validation_win_rate": 0.99, "eval/win_rate": 0.99},   # a peak: not what is selected on
            {"step": 10, "eval/validation_win_rate": v, "eval/win_rate": 1 - v}])
    assert tuning_runs(cfg) == [P.grpo_metrics(m, s) for m in ("kl-0.1", "kl-0.3", "gr-1", "gr-2") for s in (100, 101)]
    assert main(["tune", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kl"]["selected"] == "kl-0.3" and result["kl"]["points"]["kl-0.1"]["mean"] == pytest.approx(0.6)
    assert result["gr"]["selected"] == "gr-1"   # 0.5 and 0.5: the smaller gamma
    assert main(["tune", str(config)]) == 0 and "| kl | kl-0.3 | 0.650 / 0.650 | 0.650 | **yes** |" in \
        capsys.readouterr().out
    for name, experiment in (("miniature-ood-tune", "miniature-ood"), ("rlvr-ood-tune", "rlvr-ood")):
        shipped = load_config(REPO / "config" / f"{name}.yaml")
        assert shipped["seeds"] == [100, 101] and shipped["experiment"] == experiment
        assert all(len(points) == 4 for points in sweep_points(shipped).values())


def test_an_rlvr_tasks_tuning_selects_on_the_validation_problems_rule_checked_accuracy(tmp_path, capsys):
    """On an RLVR task the protocol's "gold" is the rule checker: the last evaluation's eval/validation_accuracy (not
    the judge's reward, not the test problems')."""
    from rlhf.claims import main
    from rlhf.config import load_config
    from rlhf.io import write_jsonl
    from rlhf.paths import Paths
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "config" / "rlvr-micro.yaml"), "results_dir": str(tmp_path / "results"),
        "seeds": [100], "sweeps": {"kl": {"grid": {"kl_beta": [0.1, 0.3]}}}}, sort_keys=False))
    P = Paths.from_config(load_config(config))
    for method, accuracy in (("kl-0.1", 0.2), ("kl-0.3", 0.4)):
        write_jsonl(P.grpo_metrics(method, 100), [
            {"step": 0, "eval/validation_accuracy": 0.9, "eval/accuracy": 0.9, "train/judge_correctness": 0.1},
            {"step": 10, "eval/validation_accuracy": accuracy, "eval/accuracy": 1 - accuracy,
             "train/judge_correctness": 2 - accuracy}])
    assert main(["tune", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kl"]["selected"] == "kl-0.3" and result["kl"]["points"]["kl-0.1"]["validation"] == [0.2]


def test_verdicts_name_each_claim_a_task_has_no_runs_for(tmp_path, capsys):
    """`verdicts` on a task whose runs do not exist yet: no traceback, each of its claims listed as not tested with the
    missing file."""
    from rlhf.claims import main
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"extends": str(REPO / "config" / "micro.yaml"),
                                      "results_dir": str(tmp_path / "results")}))
    assert main(["verdicts", f"miniature={config}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("0 claim-task pairs tested")
    assert "- kl-above-noreg on miniature: not tested (missing input file: " in out
    elsewhere = tmp_path / "repeat"  # --results-dir: the same config's runs made under another results_dir
    assert main(["verdicts", f"miniature={config}", "--results-dir", str(elsewhere)]) == 0
    assert f"missing input file: {elsewhere / 'micro'}" in capsys.readouterr().out


@pytest.mark.parametrize("demo, claims", [("miniature-ood-demo", "miniature-ood"), ("rlvr-ood-demo", "rlvr-ood")])
def test_make_demo_ood_runs_are_the_claims_runs_seed_0(demo, claims):
    """`make demo-ood` runs seed 0 of some of the claims' methods in the claims' experiment folder: every stage it
    runs has the claims config's settings there, so Snakemake reuses one's runs for the other (and no stage of the
    demo is one the claims lack)."""
    from rlhf.config import load_config
    from rlhf.registry import STAGES, settings_view, used_stages
    d, c = (load_config(REPO / "config" / f"{name}.yaml") for name in (demo, claims))
    assert d["experiment"] == c["experiment"] and d["seeds"] == [0] and 0 in c["seeds"]
    assert set(d["methods"]) <= set(c["methods"]) and {"noreg", "kl", "gr"} <= set(d["methods"])
    stages = set(used_stages(d)) - {"report"}  # the report is over every method: it differs
    assert stages <= set(used_stages(c))
    for stage in stages:
        for method in d["methods"] if STAGES[stage].per_run else [None]:
            assert settings_view(d, stage, method) == settings_view(c, stage, method), (stage, method)
