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
