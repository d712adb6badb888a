"""The pipeline on a real two-node Slurm 22.05 cluster started by the tests (rlhf/rehearsal/cluster.py: two network
namespaces joined by a veth pair, a private config and munge; nothing written outside the test's folder).

The micro DAG's label, rm and grpo jobs go through `snakemake --profile profiles/slurm`, rm and grpo on 2 nodes x 1
rank (rlhf/launch.py: one torchrun per node, the c10d rendezvous; rm through its TRL trainer as sft would); one GRPO
run loses its second node's rank mid-run and is resubmitted by the profile's retries, resuming from the checkpoint both
nodes wrote. The stages upstream of label run in the test's process first: through Slurm each job here costs ~20 s
more than it computes (the executor plugin sleeps 5 s before every sbatch and widens its status polls by 10 s after
each poll that finds nothing finished), and 4 more sequential jobs made this the suite's longest test after the
rehearsal (226 s). Skipped with the reason where
the cluster cannot be started (not root, no namespaces, no slurm-wlm/munge and no apt-get).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, jobs, snakemake, write_config
from rlhf.rehearsal.cluster import SlurmCluster, why_unavailable
from tests.test_distributed import deepspeed_available
from tests.test_robustness import _assert_same_run, _finished_run

MULTI_NODE = ("sft", "rm", "grpo")
UPSTREAM = ("data", "base", "sft", "sample")  # run in the test's process before Snakemake (see above)
KILLED = "gr"   # the method whose run loses a rank on the second node after its first checkpoint


@pytest.fixture(scope="module")
def fresh_stage_processes():
    """Jobs on the cluster's nodes start their stage processes fresh, as on a real cluster: no stage server in the
    environment of the daemons or of what is submitted (the server also refuses a client from another namespace)."""
    from rlhf.stage_server import ENV
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, fresh_stage_processes):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _two_node_config(folder: Path) -> Path:
    """The micro config with gr alone (GR's double backward, the hardest update to keep equal across ranks), sft / rm /
    grpo on 2 nodes (grpo under DeepSpeed ZeRO-2 where installed; sft and rm on their CPU default, the Trainer's DDP)
    and 6 GRPO steps with a checkpoint every 2, so a kill after step 3 leaves work to resume."""
    micro = yaml.safe_load((REPO / "config" / "micro.yaml").read_text())
    backend = "deepspeed" if deepspeed_available() else "torch"
    return write_config(
        folder, methods={KILLED: micro["methods"][KILLED]},
        grpo={**micro["grpo"], "backend": backend, "steps": 6, "checkpoint_every": 2},
        resources={"jobs": {stage: {"nodes": 2} for stage in MULTI_NODE}})


def _rank_processes(node, method: str) -> list[int]:
    """The GRPO worker processes of `method` on a node (torchrun's children: they carry LOCAL_RANK)."""
    found = []
    for pid in node.processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"grpo" in cmdline and method.encode() in cmdline and any(e.startswith(b"LOCAL_RANK=") for e in environ):
            found.append(pid)
    return found


def _job_state(cluster, job: str) -> str:
    out = subprocess.run(cluster.login.command("scontrol", "-o", "show", "job", job), capture_output=True,
                         text=True, env=cluster.env).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "GONE")


def _kill_second_node_rank(cluster, run_dir: Path, seen: dict) -> None:
    """When the run has logged step 3 (its step-2 checkpoint is written), SIGKILL its rank on the second node; then
    wait for that Slurm job to end and record whether anything complete-looking was left."""
    metrics, deadline = run_dir / "work" / "metrics.jsonl", time.monotonic() + 600
    node = cluster.node(cluster.names[1])
    while time.monotonic() < deadline:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        victims = _rank_processes(node, KILLED) if steps and max(steps) >= 3 else []
        if victims:
            job = next(e.split(b"=", 1)[1].decode() for e in Path(f"/proc/{victims[0]}/environ").read_bytes()
                       .split(b"\0") if e.startswith(b"SLURM_JOB_ID="))
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            seen["killed_at_step"], seen["job"] = max(steps), job
            while _job_state(cluster, job) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
                time.sleep(0.2)
            seen["state"] = _job_state(cluster, job)
            seen["left"] = sorted(p.name for p in run_dir.iterdir() if p.name != "work")
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_micro_dag_on_two_nodes_through_slurm(cluster, tmp_path):
    """Every job goes through sbatch; rm and grpo run on both nodes; the run that lost its second node's rank
    fails without a complete-looking artifact, is resubmitted (the profile's retries) and resumes on 2 nodes; its
    metrics and weights equal a 2-rank single-node torchrun of the same stage on the same inputs."""
    (tmp_path / "run").mkdir()
    cfg = _two_node_config(tmp_path / "run")
    results = tmp_path / "run" / "results" / "micro"
    target = str(results / "grpo" / KILLED / "seed0" / "policy")
    from rlhf.cli import main
    for stage in UPSTREAM:
        assert main([stage, "--config", str(cfg)]) == 0, stage
    dry = snakemake(cfg, "-n", "--profile", str(REPO / "profiles" / "slurm"), target)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "python -m rlhf.launch --nodes 2" in dry.stdout  # the launcher, from resources.jobs.<stage>.nodes
    expected = jobs(dry.stdout)
    assert expected == {"label": 1, "rm": 1, "grpo": 1}, expected
    seen: dict = {}
    killer = threading.Thread(target=_kill_second_node_rank, args=(cluster, results / "grpo" / KILLED / "seed0", seen))
    killer.start()
    run = snakemake(cfg, "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4", "--slurm-no-account",
                    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                    "--seconds-between-status-checks", "2", "--slurm-keep-successful-logs", "--latency-wait", "1",
                    target, cores="", env={**cluster.env, "PATH": os.environ["PATH"]}, on=cluster.login.command())
    killer.join(timeout=60)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # The kill: after step 3, the job failed and left only the work folder; the retry resumed from step 2.
    assert seen.get("killed_at_step", 0) >= 3 and seen["state"] == "FAILED", seen
    assert seen["left"] == [], seen
    log = (results / "logs" / f"grpo_{KILLED}_seed0.log").read_text()
    assert "resumed from step" in log, log[-3000:]
    first = (results / "logs" / f"grpo_{KILLED}_seed0.log.failed").read_text()  # the killed attempt's log, kept
    assert "rlhf.launch: node" in first and "resumed from step" not in first, first[-3000:]
    # Every job through sbatch (the killed one twice), none run locally; the plugin's per-rule logs agree.
    logs = tmp_path / "run" / ".snakemake" / "slurm_logs"
    per_rule = {p.name.removeprefix("rule_"): len(list(p.rglob("*.log"))) for p in logs.iterdir()}
    want = {**expected, "grpo": expected["grpo"] + 1}
    # A submission more than expected (3 of ~15 runs before rlhf/rehearsal/cluster.py raised SlurmdTimeout: a loaded
    # host's nodes were marked DOWN and rm requeued): a failure names the rules submitted more often than expected and
    # ends with their Slurm logs.
    why = (per_rule, [f.read_text()[-1500:] for rule, n in per_rule.items() if n != want.get(rule)
                      for f in [*sorted((logs / f"rule_{rule}").rglob("*.log")),
                                *(results / "logs").glob(f"{rule}*.failed")]])  # the failed attempt's own log
    assert cluster.submitted_jobs() == sum(want.values()), why
    assert per_rule == want, why
    # Each multi-node job was allocated both nodes and started a torchrun on each.
    allocations = (cluster.root / "slurmctld.log").read_text().count("NodeList=nodea,nodeb")
    assert allocations == sum(expected.get(s, 0) for s in MULTI_NODE) + 1
    for name in ("rm", f"grpo_{KILLED}_seed0"):
        text = (results / "logs" / f"{name}.log").read_text()
        assert all(f"rlhf.launch: node {n}: 1 rank(s)" in text for n in cluster.names), (name, text[-2000:])
    assert "2 rank(s)" in (results / "logs" / "rm.log").read_text()  # the TRL trainer saw both nodes' ranks
    # A single-node job's artifact equals the same stage run here, outside Slurm.
    import shutil
    local = tmp_path / "local" / "results" / "micro"
    shutil.copytree(results / "pairs", local / "pairs", ignore=shutil.ignore_patterns("labels.jsonl"))  # label's input
    assert main(["label", "--config", str(write_config(tmp_path / "local"))]) == 0
    assert (results / "pairs" / "labels.jsonl").read_text() == (local / "pairs" / "labels.jsonl").read_text()

    # The reference: the same GRPO stage on the same inputs, 2 ranks on one node, uninterrupted.
    reference = tmp_path / "reference"
    for part in ("data", "sft", "rm"):
        shutil.copytree(results / part, reference / "results" / "micro" / part)
    ref_cfg = _two_node_config(reference)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "rlhf", "grpo", "--config", str(ref_cfg), "--method", KILLED, "--seed", "0",
                          "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_same_run(_finished_run(results / "grpo" / KILLED / "seed0"),
                     _finished_run(reference / "results" / "micro" / "grpo" / KILLED / "seed0"))


def test_a_misconfigured_node_fails_the_launch_in_one_line(cluster, tmp_path):
    """On the real cluster: GLOO_SOCKET_IFNAME naming no interface stops the nodes before torchrun, with one line that
    names the node; a job with fewer nodes than the config asks is refused before srun."""
    def job(nodes: int, env: dict) -> str:
        script = tmp_path / f"job{nodes}.sh"
        script.write_text(f"#!/bin/sh\ncd {REPO}\n{sys.executable} -m rlhf.launch --nodes 2 -- -m rlhf grpo\n")
        out = tmp_path / f"job{nodes}.out"
        done = subprocess.run(cluster.login.command("sbatch", "--wait", f"--nodes={nodes}", f"--ntasks={nodes}",
                                                    "-o", str(out), str(script)),
                              capture_output=True, text=True, env={**cluster.env, **env}, timeout=120)
        assert done.returncode != 0, done.stdout + done.stderr
        return out.read_text()
    text = job(2, {"GLOO_SOCKET_IFNAME": "ib0"})
    # the first node to fail ends the step (srun --kill-on-bad-exit): at least one says why, none started torchrun
    assert any(f"rlhf.launch: node {node}: GLOO_SOCKET_IFNAME=ib0 names no interface here (this node has: eth0, lo)"
               in text for node in cluster.names), text
    assert "torch.distributed" not in text and "Traceback" not in text
    text = job(1, {})
    assert "has 1 node(s), the config asks 2" in text and "--nodes 2" in text, text
