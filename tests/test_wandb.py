"""wandb logging (rlhf/metrics_log.py): offline by default, one run per training job grouped by experiment, the same
run continued after a resume, nothing secret written. Runs the real wandb client offline (no network)."""
from __future__ import annotations

import shutil

import pytest

from rlhf.metrics_log import public, wandb_id
from tests.conftest import write_config
from tests.test_stages import _copy_upstream, _interrupt_at_step

SECRET = "sk-test-DO-NOT-LOG-4242"


def test_run_ids_are_stable_valid_and_short():
    assert wandb_id("gr-tldr-pythia-1b", "grpo-gr-0.01-seed2") == "gr-tldr-pythia-1b-grpo-gr-0.01-seed2"
    long = wandb_id("x" * 80, "grpo/a b")
    assert len(long) == 64 and long == wandb_id("x" * 80, "grpo/a b") and long != wandb_id("x" * 81, "grpo/a b")
    assert public({"lr": 1, "judge": {"api_key_env": "OPENAI_API_KEY", "model": "m"}, "hf_token": "t"}) == \
        {"lr": 1, "judge": {"model": "m"}}


def test_offline_runs_per_job_resume_and_hold_no_secret(micro_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional dependency (pip install -e '.[wandb]')")
    from rlhf.cli import main
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    dst = _copy_upstream(micro_run, tmp_path)
    shutil.copytree(micro_run[1] / "base", dst / "base")
    cfg = write_config(tmp_path, wandb={"enabled": True})
    assert main(["sft", "--config", str(cfg)]) == 0
    restore = _interrupt_at_step(monkeypatch, 4)  # preempted after the step-2 checkpoint, then resumed
    with pytest.raises(KeyboardInterrupt):
        main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"])
    restore()
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"]) == 0

    runs = sorted(p.name for p in (dst / "wandb" / "wandb").glob("offline-run-*"))
    grpo_runs = list((dst / "wandb" / "wandb").glob("offline-run-*-micro-grpo-noreg-seed0*"))
    assert len(grpo_runs) == 2, runs  # the resumed job logged to the same run id
    assert list((dst / "wandb" / "wandb").glob("offline-run-*-micro-sft"))
    for run in grpo_runs:
        log = next(run.glob("run-micro-grpo-noreg-seed0*.wandb")).read_bytes()
        assert b"proxy_reward" in log and b"micro" in log  # metrics, and the experiment as group
    for f in (dst / "wandb").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert (dst / "grpo" / "noreg" / "seed0" / "metrics.jsonl").is_file()  # local metrics as always


def test_a_resumed_run_logs_every_step_again_with_the_step_as_a_metric(micro_run, tmp_path, monkeypatch):
    """wandb keeps a row only if its own step is above the last: a job resumed from its step-2 checkpoint after
    logging step 4 would lose steps 3-4 of the resumed trajectory if it passed step=. Our step goes in as a metric
    (every chart's x axis), so each resumed row is logged, marked with the step it resumed from."""
    import sys
    import types

    from rlhf.cli import main
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.metrics, self.summary = kwargs, [], [], {}
            runs.append(self)

        def define_metric(self, name, **kw):
            self.metrics.append((name, kw))

        def log(self, data, **kw):
            assert not kw, "wandb's own step must be left alone"
            self.logged.append(data)

        def finish(self, exit_code=0):
            pass
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(**kw)))
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path, wandb={"enabled": True})
    restore = _interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"])
    restore()
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0"]) == 0
    first, resumed = runs
    assert first.kwargs["id"] == resumed.kwargs["id"] and ("*", {"step_metric": "step"}) in resumed.metrics
    trained = lambda run: [r["step"] for r in run.logged if "proxy_reward" in r]  # noqa: E731
    assert trained(first)[-1] == 3 and trained(resumed) == [3, 4]  # step 3 logged again, from the checkpoint
    assert all(r["resume/from_step"] == 2 for r in resumed.logged)
    import pandas as pd
    local = pd.read_json(tmp_path / "results" / "micro" / "grpo" / "noreg" / "seed0" / "metrics.jsonl", lines=True)
    trained_rows = local.dropna(subset=["proxy_reward"]).set_index("step")["proxy_reward"]
    for row in resumed.logged:
        if "proxy_reward" in row:
            assert row["proxy_reward"] == pytest.approx(trained_rows.loc[row["step"]])
