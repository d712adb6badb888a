"""The micro DAG through `snakemake --profile profiles/slurm` on a real single-node Slurm started by the test.

Runs where the test is root (it installs slurm-wlm and munge with apt-get if needed and starts munged,
slurmctld and slurmd); skipped with the reason otherwise. Checks that every non-local job went through sbatch
and that the artifacts match the same DAG run by local Snakemake.
"""
import json
import os
import shutil

import pytest
import yaml

from tests.conftest import REPO, jobs, snakemake, write_config
from tests.slurm_cluster import LocalSlurm, why_unavailable

LOCAL_RULES = {"all"}
# Two of the micro config's methods (GR's double backward among them) keep the test to ~12 jobs; the shared stages and
# these methods' jobs are the same as in the local run of all five.
METHODS = ("noreg", "gr")


@pytest.mark.slow
def test_micro_dag_through_slurm_matches_a_local_run(tmp_path, micro_snakemake):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake is not on PATH for the Slurm jobs (activate the environment)")
    local_cfg, _, local_run = micro_snakemake
    assert local_run.returncode == 0, local_run.stderr[-2000:]
    (tmp_path / "run").mkdir()
    methods = yaml.safe_load(local_cfg.read_text())["methods"]
    cfg = write_config(tmp_path / "run", methods={m: methods[m] for m in METHODS})
    expected = {rule: n for rule, n in jobs(snakemake(cfg, "-n").stdout).items() if rule not in LOCAL_RULES}
    assert expected["grpo"] == len(METHODS)
    with LocalSlurm(tmp_path / "slurm") as slurm:
        run = snakemake(cfg, "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4",
                        "--slurm-no-account", "--slurm-status-command", "squeue",
                        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                        "--slurm-keep-successful-logs", "--latency-wait", "1",
                        "--retries", "0", cores="", env={**slurm.env, "PATH": os.environ["PATH"]})
        submitted = slurm.submitted_jobs()
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert submitted == sum(expected.values())  # every job through sbatch, none run locally
    logs = tmp_path / "run" / ".snakemake" / "slurm_logs"
    per_rule = {p.name.removeprefix("rule_"): len(list(p.rglob("*.log"))) for p in logs.iterdir()}
    assert per_rule == expected
    # same inputs, same code, same threads: the artifacts equal the local run's
    here, there = tmp_path / "run" / "results" / "micro", local_cfg.parent / "results" / "micro"
    for name in ("data/train.jsonl", "pairs/samples.jsonl", "pairs/labels.jsonl", "rm/metrics.json"):
        assert (here / name).read_text() == (there / name).read_text(), name
    for method in ("sft", *METHODS):
        a, b = (json.loads((d / "eval" / method / "seed0" / "metrics.json").read_text()) for d in (here, there))
        assert a.keys() == b.keys() and a["method"] == b["method"], method
        numbers = [k for k, v in a.items() if isinstance(v, (int, float))]
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-6, abs=1e-9), method
