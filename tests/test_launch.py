"""rlhf/launch.py and the multi-node resources (rlhf/cluster.py) without a cluster: each check's one line, the
commands it hands over to, and what Snakemake asks sbatch for. tests/test_slurm.py runs them on a two-node Slurm."""
import socket

import pytest

from rlhf.launch import LaunchError, job_side, main, node_problem, node_side
from tests.conftest import REPO, snakemake, write_config

HOSTS = {"nodea": ["10.0.0.1"], "nodeb": ["10.0.0.2"], "loopy": ["127.0.1.1"]}


def resolve(name):
    if name not in HOSTS:
        raise socket.gaierror(-2, "Name or service not known")
    return HOSTS[name]


def problem(hostname="nodeb", rdzv="nodea", env=None, interfaces=("lo", "eth0"), gloo=True):
    return node_problem("n2", hostname, rdzv, env or {}, list(interfaces), resolve, gloo)


def test_a_healthy_node_has_no_problem():
    assert problem() is None
    assert problem(env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth"}) is None  # NCCL: a prefix
    assert problem(env={"NCCL_SOCKET_IFNAME": "^docker,lo"}) is None and problem(env={"NCCL_SOCKET_IFNAME": "=eth0"}) is None
    assert problem(hostname="loopy", gloo=False) is None           # NCCL picks its own interface
    assert problem(hostname="loopy", env={"GLOO_SOCKET_IFNAME": "eth0"}) is None


@pytest.mark.parametrize("kw, says", [
    (dict(hostname="ghost"), "node n2: its hostname 'ghost' does not resolve"),
    (dict(rdzv="ghost"), "node n2: the rendezvous host 'ghost' (the job's first node) does not resolve here"),
    (dict(env={"GLOO_SOCKET_IFNAME": "ib0"}), "node n2: GLOO_SOCKET_IFNAME=ib0 names no interface here "
                                              "(this node has: eth0, lo)"),
    (dict(env={"GLOO_SOCKET_IFNAME": "eth0,ib0"}), "GLOO_SOCKET_IFNAME=eth0,ib0 names no interface"),
    (dict(env={"NCCL_SOCKET_IFNAME": "ib"}), "node n2: NCCL_SOCKET_IFNAME=ib names no interface"),
    (dict(env={"NCCL_SOCKET_IFNAME": "=eth"}), "NCCL_SOCKET_IFNAME==eth names no interface"),
    (dict(hostname="loopy"), "node n2: its hostname 'loopy' resolves to 127.0.1.1 (loopback), where gloo would listen"),
])
def test_each_problem_is_one_line_naming_the_node_and_the_remedy(kw, says):
    line = problem(**kw)
    assert line is not None and says in line and "\n" not in line
    assert any(remedy in line for remedy in ("/etc/hosts", "set it to the interface", "set GLOO_SOCKET_IFNAME"))


def test_the_job_side_hands_over_to_srun_and_the_node_side_to_torchrun(monkeypatch, capsys):
    from types import SimpleNamespace
    import rlhf.launch as launch
    args = SimpleNamespace(nodes=2, gpus_per_node=8, cpus_per_node=16, rdzv_endpoint=None)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.delenv("RLHF_RDZV_PORT", raising=False)
    allocation = {"1234": (2, "gpu07")}
    monkeypatch.setattr(launch, "_allocation", lambda job: allocation[job])
    cmd = job_side(args, ["-m", "rlhf", "grpo", "--seed", "0"])
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=16",
                       "--kill-on-bad-exit=1"]
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu07:29634"  # 29400 + job id mod 1000
    assert cmd[-6:] == ["--", "-m", "rlhf", "grpo", "--seed", "0"]
    allocation["1234"] = (1, "gpu07")
    with pytest.raises(LaunchError, match="has 1 node"):
        job_side(args, ["-m", "rlhf", "grpo"])

    monkeypatch.setattr(launch, "_addresses", resolve)
    monkeypatch.setattr(socket, "gethostname", lambda: "nodeb")
    monkeypatch.setenv("SLURMD_NODENAME", "nodeb")
    node = SimpleNamespace(nodes=2, gpus_per_node=8, rdzv_endpoint="nodea:29634")
    cmd = node_side(node, ["-m", "rlhf", "grpo"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend",
                       "c10d", "--rdzv-id", "1234", "--rdzv-endpoint", "nodea:29634", "--max-restarts", "0",
                       "-m", "rlhf", "grpo"]
    assert "rlhf.launch: node nodeb: 8 rank(s), c10d rendezvous at nodea:29634" in capsys.readouterr().out


def test_outside_slurm_the_launcher_says_what_to_do(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--nodes", "2", "--", "-m", "rlhf", "grpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runs outside a Slurm job" in err and "profiles/slurm" in err


def test_multi_node_resources_and_launcher(tmp_path):
    """nodes > 1: one task per node, GPUs per node as gres, the jobstep runs the command once (mpi) and rlhf.launch
    spreads it; world sizes that do not split the batch and nodes on a one-process stage are refused."""
    from rlhf.cluster import launcher, ranks, snakemake_resources
    from rlhf.config import ConfigError, config_from_mapping, load_config
    cfg = load_config(REPO / "config" / "paper" / "gr-tldr-pythia-1b.yaml")
    cfg["resources"]["jobs"]["grpo"] = {**cfg["resources"]["jobs"]["grpo"], "nodes": 2}
    res = snakemake_resources(cfg, "grpo")
    assert res == {"mem_mb": 256000, "runtime": 2880, "cpus_per_task": 32, "nodes": 2, "tasks": 2, "mpi": "srun",
                   "gres": "gpu:8", "tasks_per_gpu": 0}
    assert launcher(cfg, "grpo") == "python -m rlhf.launch --nodes 2 --gpus-per-node 8 --cpus-per-node 32 --"
    assert ranks(cfg, "grpo") == 16 and ranks(cfg, "sft") == 8 and ranks(cfg, "sample") == 1
    assert launcher(cfg, "sft") == "torchrun --standalone --nproc-per-node 8"  # unchanged: one node
    micro = load_config(REPO / "config" / "micro.yaml")
    with pytest.raises(ConfigError, match=r"prompts_per_step = 2 does not split over the 3 nodes of resources.jobs.grpo"):
        config_from_mapping({**micro, "resources": {"jobs": {"grpo": {"nodes": 3}}}})
    with pytest.raises(ConfigError, match=r"resources.jobs.sample.nodes = 2: only the data-parallel stages"):
        config_from_mapping({**micro, "resources": {"jobs": {"sample": {"nodes": 2}}}})
    with pytest.raises(ConfigError, match=r"resources.jobs.default.nodes = 2"):
        config_from_mapping({**micro, "resources": {"jobs": {"default": {"nodes": 2}}}})
    two = write_config(tmp_path, resources={"jobs": {"grpo": {"nodes": 2}}})
    dry = snakemake(two, "-n", "-p", str(tmp_path / "results" / "micro" / "grpo" / "noreg" / "seed0" / "policy"))
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "python -m rlhf.launch --nodes 2 --gpus-per-node 0 --cpus-per-node 1 -- -m rlhf grpo" in dry.stdout
