"""Every stage on the micro config through the CLI, and what bad inputs do."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rlhf.cli import main
from rlhf.io import read_json
from rlhf.models import load_tokenizer
from tests.conftest import REPO, write_config


def test_stage_artifacts(micro_run):
    _, root = micro_run
    train = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 200 and set(train[0]) >= {"prompt", "reference"}
    for folder in ("base", "sft", "rm", "grpo/noreg/seed0/policy", "grpo/kl/seed0/policy"):
        assert (root / folder / "config.json").is_file() and (root / folder / "model.safetensors").is_file(), folder
    tok = load_tokenizer(root / "sft")
    assert tok("post : alice tldr :", add_special_tokens=False)["input_ids"]
    labels = [json.loads(line) for line in (root / "pairs" / "labels.jsonl").read_text().splitlines()]
    # label noise (T = 0.1) flips some labels, but most chosen completions are the gold-better ones
    assert sum(r["gold_chosen"] > r["gold_rejected"] for r in labels) > 0.7 * len(labels)
    assert {"prompt", "chosen", "rejected"} <= set(labels[0])
    assert not list(root.rglob("*.tmp-*")), "temporary artifacts left behind"
    assert not (root / "grpo" / "noreg" / "seed0" / "work").exists(), "work folder of a finished run kept"


def test_micro_artifacts_match_the_stored_expectations(micro_run):
    """Every stage's numbers on the micro config against tests/expected/micro.json, within tolerances wide enough
    for another CPU's kernels (regenerate after an intended change: python -m tests.expectations)."""
    from tests.expectations import EXPECTED, differences, measure
    assert differences(measure(micro_run[1]), json.loads(EXPECTED.read_text())) == []


def test_expectations_catch_a_broken_stage():
    """The tolerances are narrower than what a broken stage changes: labels inverted (the RM learns the opposite
    preference) or an untrained RM (chance accuracy) both fall outside."""
    from tests.expectations import EXPECTED, differences
    expected = json.loads(EXPECTED.read_text())
    inverted = {**expected, "pairs/gold_consistent": expected["pairs/labels"] - expected["pairs/gold_consistent"],
                "rm/accuracy_vs_gold_order": 1 - expected["rm/accuracy_vs_gold_order"]}
    assert [d.split(":")[0] for d in differences(inverted, expected)] == ["pairs/gold_consistent",
                                                                          "rm/accuracy_vs_gold_order"]
    assert differences({**expected, "rm/accuracy_vs_gold_order": 0.4}, expected) != []  # an RM at chance


def test_grpo_metrics_log_every_step_and_gold_evals(micro_run):
    _, root = micro_run
    df = pd.read_json(root / "grpo" / "noreg" / "seed0" / "metrics.jsonl", lines=True)
    train = df.dropna(subset=["proxy_reward"])
    assert train["step"].tolist() == [1, 2, 3, 4]
    for col in ("proxy_reward", "kl", "grad_norm", "length", "entropy", "time/step", "time/generate", "time/update",
                "time/advantages"):
        assert train[col].notna().all(), col
    evals = df.dropna(subset=["eval/win_rate"])
    assert evals["step"].tolist() == [0, 2, 4]
    assert evals["eval/kl"].iloc[0] == pytest.approx(0.0, abs=1e-5)  # step 0 is the initial policy itself


def test_evaluate_and_report(micro_run):
    _, root = micro_run
    rows = [json.loads(r) for r in (root / "eval" / "kl" / "seed0" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"completion", "outcome", "gold_reward", "proxy_reward", "kl"} <= set(rows[0])
    # each outcome recomputed from the miniature's true reward, the win rate and its interval from those
    from rlhf.config import load_config
    from rlhf.data.miniature import MiniatureSpec, true_reward
    spec = MiniatureSpec.from_config(load_config(micro_run[0]))
    want = [0.5 + 0.5 * np.sign(true_reward(r["prompt"], r["completion"], spec) -
                                true_reward(r["prompt"], r["reference"], spec)) for r in rows]
    assert [r["outcome"] for r in rows] == want
    m, mean = read_json(root / "eval" / "kl" / "seed0" / "metrics.json"), np.mean(want)
    half = 1.959964 * np.std(want, ddof=1) / np.sqrt(len(want))
    assert (m["win_rate"], m["win_rate_ci_low"], m["win_rate_ci_high"]) == \
        pytest.approx((mean, max(0, mean - half), min(1, mean + half)))
    table = pd.read_csv(root / "report" / "table.csv")
    assert table["method"].tolist() == ["sft", "noreg", "kl", "resets", "gr", "signcert"]
    assert (root / "report" / "table.md").read_text().startswith("| method |")
    for png in ("rewards_vs_step.png", "gold_vs_kl.png", "diagnostics.png", "radius_validation.png"):
        assert (root / "report" / png).stat().st_size > 5000
    md = (root / "report" / "table.md").read_text()
    deciles = pd.read_csv(root / "certify" / "deciles.csv")
    assert deciles["n"].sum() == 32  # 8 prompts x G = 4, none dropped
    for _, r in deciles.iterrows():  # the certify stage's rows, in the report
        assert f"| {int(r['bin']) + 1} | {r['radius_mean']:.4f} | {int(r['n'])} |" in md
    over = pd.read_csv(root / "report" / "overoptimization.csv")
    assert set(over["method"]) == {"noreg", "kl", "resets", "gr", "signcert"}


def test_decile_table_on_a_hand_worked_example():
    from rlhf.stages.certify import decile_table
    t = decile_table(pd.DataFrame({"radius": [.1, .2, .3, .4, 1, 2, 3, 4], "model_noise": [0, 0, .5, .5, 1, 1, 1, .5]}), 2)
    assert t["n"].tolist() == [4, 4] and t["radius_mean"].tolist() == pytest.approx([0.25, 2.5])
    assert t["model_noise"].tolist() == pytest.approx([0.25, 0.875])
    assert t["model_noise_ci"].tolist() == pytest.approx([0.282902, 0.245], abs=1e-6)


def test_stage_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    assert "--method" in capsys.readouterr().out


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    cfg = write_config(tmp_path, grpo={"stepz": 3})
    assert main(["data", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "grpo.stepz" in err and "Traceback" not in err


def test_missing_input_file_names_it_and_writes_nothing(micro_config, capsys):
    assert main(["sft", "--config", str(micro_config)]) == 2
    assert "missing input file" in capsys.readouterr().err
    assert not (micro_config.parent / "results" / "micro" / "sft").exists()


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text('{"prompt": "p", "reference": "r"}\n')
    cfg = write_config(tmp_path, data={"source": "jsonl", "train_file": str(tmp_path / "train.jsonl"),
                                        "test_file": str(tmp_path / "test.jsonl")},
                       model={"name": "unused"})
    assert main(["data", "--config", str(cfg)]) == 2
    assert "empty dataset" in capsys.readouterr().err
    assert not (tmp_path / "results" / "micro" / "data" / "train.jsonl").exists()


def test_jsonl_missing_column_is_named(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "summary": "r"}\n')
    cfg = write_config(tmp_path, data={"source": "jsonl", "train_file": str(tmp_path / "train.jsonl"),
                                        "test_file": str(tmp_path / "train.jsonl")}, model={"name": "unused"})
    assert main(["data", "--config", str(cfg)]) == 2
    assert "missing column(s) reference" in capsys.readouterr().err


def _copy_upstream(micro_run, tmp_path):
    import shutil
    _, root = micro_run
    dst = tmp_path / "results" / "micro"
    for part in ("data", "sft", "rm"):
        shutil.copytree(root / part, dst / part)
    return dst


def test_nan_proxy_reward_fails_clearly_without_a_policy(micro_run, tmp_path, capsys):
    dst = _copy_upstream(micro_run, tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(dst / "rm" / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, dst / "rm" / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path)
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"]) == 2
    assert "non-finite reward" in capsys.readouterr().err
    assert not (dst / "grpo" / "noreg" / "seed0" / "policy").exists()


def _interrupt_at_step(monkeypatch, n):
    """Make the n-th GRPO update raise, as a preemption would."""
    from rlhf import trainer
    real_step, calls = trainer.grpo_step, []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "grpo_step", dying_step)
    return lambda: monkeypatch.setattr(trainer, "grpo_step", real_step)


def test_grpo_resumes_from_checkpoint(micro_run, tmp_path, monkeypatch, capsys):
    """A run killed after its step-2 checkpoint resumes there; the metrics read like an uninterrupted run."""
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    restore = _interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main(["grpo", "--config", str(cfg), "--method", "kl", "--seed", "0"])
    run_dir = dst / "grpo" / "kl" / "seed0"
    ckpt = run_dir / "work" / "checkpoint"  # the work folder: kept across attempts, not a Snakemake output
    assert (ckpt / "trainer_state.pt").is_file() and not (run_dir / "policy").exists()
    assert not (run_dir / "metrics.jsonl").exists()  # the output appears only with the policy
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=False)
    steps = [int(v["step"]) for v in optimizer["optimizer"]["state"].values()]
    assert state["step"] == 2 and steps and set(steps) == {2}  # the optimizer that was stepped, not a fresh one
    restore()
    assert main(["grpo", "--config", str(cfg), "--method", "kl", "--seed", "0"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    df = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    assert df.dropna(subset=["proxy_reward"])["step"].tolist() == [1, 2, 3, 4]
    assert df.dropna(subset=["eval/win_rate"])["step"].tolist() == [0, 2, 4]
    assert (run_dir / "policy" / "model.safetensors").is_file() and not (run_dir / "work").exists()


def test_checkpoint_from_other_settings_is_not_resumed(micro_run, tmp_path, monkeypatch, capsys):
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    restore = _interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"])
    restore()
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0", "grpo.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert "ignoring checkpoint" in out and "resumed" not in out


def test_extended_run_resumes_its_checkpoint(micro_run, tmp_path, monkeypatch, capsys):
    """steps, eval_every and checkpoint_every do not shape the trajectory: a preempted run rerun with more steps
    (and other side settings) resumes, and ends where an uninterrupted run with those settings ends."""
    from safetensors.torch import load_file
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    args = ["grpo", "--config", str(cfg), "--method", "gr", "--seed", "0"]
    longer = ["grpo.steps=6", "grpo.eval_every=3", "grpo.checkpoint_every=3"]
    assert main(args + longer) == 0
    reference = load_file(dst / "grpo" / "gr" / "seed0" / "policy" / "model.safetensors")
    train = lambda: _metrics(dst, "gr").dropna(subset=["proxy_reward"]).filter(regex=r"^(?!time/)")  # noqa: E731
    expected = train()
    restore = _interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main(args)  # steps 4, checkpoint every 2: dies in step 4 after the step-2 checkpoint
    restore()
    capsys.readouterr()
    assert main(args + longer) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    for key, tensor in load_file(dst / "grpo" / "gr" / "seed0" / "policy" / "model.safetensors").items():
        assert torch.equal(tensor, reference[key]), key
    pd.testing.assert_frame_equal(train().reset_index(drop=True), expected.reset_index(drop=True))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """SIGKILL while a metrics line is written leaves half a line: resume drops it; corruption elsewhere is named."""
    from rlhf.errors import DataError
    from rlhf.metrics_log import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    log = MetricsLog(path, resume_step=2)
    log.write(3, {"loss": 0.3})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.3}\n')
    with pytest.raises(DataError, match="metrics.jsonl:2"):
        MetricsLog(path, resume_step=2)


def _metrics(root, method):
    return pd.read_json(root / "grpo" / method / "seed0" / "metrics.jsonl", lines=True)


def test_regularizer_diagnostics_are_logged(micro_run):
    _, root = micro_run
    train = lambda m: _metrics(root, m).dropna(subset=["proxy_reward"])  # noqa: E731
    resets = train("resets")
    assert resets.loc[resets["reference_reset"] == 1, "step"].tolist() == [2, 4]  # exactly at multiples of R = 2
    gr = train("gr")
    assert gr["g2_norm"].notna().all() and (gr["g1_norm"] > 0).all()
    assert "g2_norm" not in train("noreg")
    sc = train("signcert")  # q = 0.25: a quarter of the nonzero advantages fall inside the radius (+ rounding)
    assert ((sc["signcert/rho_negative"] - 0.25 * (1 - sc["signcert/degenerate_groups"])).abs() < 0.2).all()
    assert (sc["signcert/epsilon"] > 0).all() and sc["signcert/log10_radius_p50"].notna().all()
    assert gr["gr/realized_perturbation"].sub(1).abs().max() < 1e-2  # float32 weights keep the perturbation
    assert (train("kl")["kl_beta"] == 0.1).all() and (train("noreg")["kl_beta"] == 0).all()
    evals = _metrics(root, "noreg").dropna(subset=["eval/win_rate"])
    assert evals["onpolicy/bt_loss"].notna().any() and evals["onpolicy/rm_accuracy"].notna().any()
    sharp = _metrics(root, "noreg").dropna(subset=["sharpness"])
    assert sharp["step"].tolist() == [0, 4]


def test_scheduled_beta_and_contradictory_settings(micro_run, tmp_path, capsys):
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path, methods={"sched": {"kl_beta": 0.2, "kl_beta_decay_every": 2}})
    assert main(["grpo", "--config", str(cfg), "--method", "sched", "--seed", "0"]) == 0
    df = _metrics(tmp_path / "results" / "micro", "sched").dropna(subset=["proxy_reward"])
    assert df["kl_beta"].tolist() == pytest.approx([0.2, 0.2, 0.1, 0.1])
    bad = write_config(tmp_path, methods={"x": {"reset_every": 2}})
    assert main(["grpo", "--config", str(bad), "--method", "x", "--seed", "0"]) == 2
    assert "reset_every needs kl_beta" in capsys.readouterr().err


def test_kl_metric_every_k_steps(micro_run, tmp_path):
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path, methods={"a": {"kl_metric_every": 2}, "b": {"kl_metric_every": 2, "kl_beta": 0.1}})
    root = tmp_path / "results" / "micro"
    for m in ("a", "b"):
        assert main(["grpo", "--config", str(cfg), "--method", m, "--seed", "0"]) == 0
    a, b = (_metrics(root, m).dropna(subset=["proxy_reward"]) for m in ("a", "b"))
    assert a.dropna(subset=["kl"])["step"].tolist() == [2, 4]
    assert b["kl"].notna().all()  # the KL penalty computes pi_init log-probs anyway, so the metric is free


def test_training_trajectory_does_not_depend_on_evaluation_frequency(micro_run, tmp_path):
    """Diagnostics use their own RNG streams: evaluating more often must not change what is trained."""
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path, methods={"a": {"eval_every": 1, "sharpness_every": 0, "eval_train_prompts": 8},
                                          "b": {"eval_every": 4}})
    for m in ("a", "b"):
        assert main(["grpo", "--config", str(cfg), "--method", m, "--seed", "0"]) == 0
    root = tmp_path / "results" / "micro"
    a, b = (_metrics(root, m).dropna(subset=["proxy_reward"]) for m in ("a", "b"))
    assert a["proxy_reward"].tolist() == pytest.approx(b["proxy_reward"].tolist(), rel=1e-6)
    # the early-stopping signal (GR Sec. 5.1): the win rate on the first 8 training prompts, at every evaluation
    evals = _metrics(root, "a").dropna(subset=["eval/win_rate"])
    assert evals["step"].tolist() == [0, 1, 2, 3, 4] and (evals["eval/train_n"] == 8).all()
    assert evals["eval/train_win_rate"].between(0, 1).all() and "eval/train_win_rate" not in _metrics(root, "b")


def test_certify_markdown_says_undefined_for_a_correlation_of_a_constant(tmp_path):
    """certify writes None where a Spearman correlation is undefined; the report stage crashed formatting it."""
    import json

    import pandas as pd

    from rlhf.stages.report import certify_markdown
    pd.DataFrame({"bin": [0], "radius_mean": [0.1], "n": [4], "gold_agreement": [1.0]}).to_csv(
        tmp_path / "deciles.csv", index=False)
    (tmp_path / "summary.json").write_text(json.dumps({"spearman_radius_gold_agreement": None,
                                                       "spearman_radius_model_noise": 0.5}))
    text = certify_markdown(tmp_path)
    assert "gold_agreement undefined" in text and "model_noise 0.50" in text


def test_validation_prompts_are_made_after_the_test_ones_and_judged_at_each_evaluation(micro_run, tmp_path):
    """data.num_validation: the data stage writes validation rows without changing train or test (the generator's
    stream goes on after them), none of their prompts in train or test; GRPO judges them at each evaluation
    (eval/validation_*), on their own RNG stream: the training trajectory is the one without them."""
    from rlhf.io import read_jsonl
    _, upstream = micro_run
    dst = _copy_upstream(micro_run, tmp_path)
    micro = yaml.safe_load((REPO / "config" / "micro.yaml").read_text())
    cfg = write_config(tmp_path, data={**micro["data"], "num_validation": 8}, methods={"noreg": {}})
    assert main(["data", "--config", str(cfg)]) == 0
    for split in ("train", "test"):
        assert (dst / "data" / f"{split}.jsonl").read_text() == (upstream / "data" / f"{split}.jsonl").read_text()
    validation = read_jsonl(dst / "data" / "validation.jsonl")
    seen = {r["prompt"] for split in ("train", "test") for r in read_jsonl(dst / "data" / f"{split}.jsonl")}
    assert len(validation) == 8 and not {r["prompt"] for r in validation} & seen
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"]) == 0
    got, before = _metrics(dst, "noreg"), _metrics(upstream, "noreg")
    evals = got.dropna(subset=["eval/win_rate"])
    assert evals["step"].tolist() == [0, 2, 4] and (evals["eval/validation_n"] == 8).all()
    assert evals["eval/validation_win_rate"].between(0, 1).all()
    train = lambda m: m.dropna(subset=["proxy_reward"])["proxy_reward"].tolist()  # noqa: E731
    assert train(got) == pytest.approx(train(before), rel=1e-6)


def test_validation_rows_need_a_source_that_makes_them(tmp_path):
    from rlhf.config import load_config
    from rlhf.data import load_splits_with_validation
    from rlhf.errors import DataError
    cfg = load_config(write_config(tmp_path))
    assert load_splits_with_validation(cfg)[2] == []
    with pytest.raises(DataError, match="data.num_validation: only the miniature and arithmetic sources"):
        load_splits_with_validation({**cfg, "data": {**cfg["data"], "source": "tldr", "num_validation": 4}})


def test_rollouts_every_k_steps_keep_what_the_policy_wrote_and_change_nothing_else(micro_run, tmp_path):
    """grpo.rollouts_every: every k-th update's completions with their prompts and training rewards (the logged
    proxy_reward is their mean), in a declared output; the trajectory is the run without it."""
    from rlhf.io import read_jsonl
    _, upstream = micro_run
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path, methods={"noreg": {"rollouts_every": 2}})
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"]) == 0
    rows = read_jsonl(dst / "grpo" / "noreg" / "seed0" / "rollouts.jsonl")
    got, before = _metrics(dst, "noreg"), _metrics(upstream, "noreg")
    assert [r["step"] for r in rows] == [2] * 8 + [4] * 8 and all(r["prompt"] and "completion" in r for r in rows)
    logged = got.dropna(subset=["proxy_reward"]).set_index("step")["proxy_reward"]
    for step in (2, 4):
        assert np.mean([r["reward"] for r in rows if r["step"] == step]) == pytest.approx(logged[step], rel=1e-5)
    train = lambda m: m.dropna(subset=["proxy_reward"])["proxy_reward"].tolist()  # noqa: E731
    assert train(got) == pytest.approx(train(before), rel=1e-6)
    assert not (dst / "grpo" / "noreg" / "seed0" / "work").exists()
