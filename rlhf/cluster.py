"""What each rule asks a cluster for, from the experiment config (read by the Snakefile).

`launcher` is how a rule starts its stage: one process; or, for a data-parallel stage (sft, rm, grpo, ...) on a job
with several GPUs, torchrun with one rank per GPU on the job's node (rlhf/distributed.py); or, on `nodes > 1`,
rlhf/launch.py, which starts one torchrun per node with srun and the c10d rendezvous (one rank per GPU per node,
one per node without GPUs).

Resource names are those snakemake-executor-plugin-slurm maps to sbatch flags: `gpu` (--gpus), `cpus_per_task`,
`mem_mb`, `runtime` (minutes), `slurm_partition`; for several nodes `nodes`, `tasks` (= nodes: one torchrun per
node), `gres` (gpu:<per node>: --gpus would be the job's total) and `mpi` (the jobstep executor then runs the
command once, on the job's first node, and the command's own srun spreads it). Single-node GPU rules never set
`tasks`: the plugin (2.x) would turn it into --ntasks-per-gpu and start the job once per task.
"""
from __future__ import annotations

from rlhf.registry import STAGES

# cpus is also the job's torch threads: one for every stage unless the config says otherwise. On the miniature two
# threads made SFT, the RM and DPO only 6-10% faster (bit-identical weights) while holding both cores of a 2-core
# machine, idling work that could run beside them; paper configs set cpus per stage (config/paper/cluster.base.yaml).
BUILTIN = {"gpus": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60, "nodes": 1}


def job_spec(cfg: dict, rule: str) -> dict:
    jobs = cfg["resources"]["jobs"]
    return {**BUILTIN, **jobs.get("default", {}), **jobs.get(rule, {})}


def ranks(cfg: dict, rule: str) -> int:
    """The job's world size: one rank per GPU per node (one per node without GPUs); 1 for one process."""
    spec = job_spec(cfg, rule)
    return spec["nodes"] * max(spec["gpus"], 1) if STAGES[rule].data_parallel else 1


def ranks_text(cfg: dict, rule: str) -> str:
    """The ranks in words, for messages: "8 GPUs", "2 nodes x 8 GPUs", "2 nodes"."""
    spec = job_spec(cfg, rule)
    gpus = f"{spec['gpus']} GPUs"
    return (f"{spec['nodes']} nodes" + (f" x {gpus}" if spec["gpus"] else "")) if spec["nodes"] > 1 else gpus


def snakemake_resources(cfg: dict, rule: str) -> dict:
    spec = job_spec(cfg, rule)
    res = {"mem_mb": spec["mem_mb"], "runtime": spec["runtime"], "cpus_per_task": spec["cpus"]}
    if spec["nodes"] > 1:  # mem_mb and cpus_per_task are per node (--mem, one task per node)
        res.update(nodes=spec["nodes"], tasks=spec["nodes"], mpi="srun")
        if spec["gpus"]:
            res.update(gres=f"gpu:{spec['gpus']}", tasks_per_gpu=0)  # 0: no --ntasks-per-gpu
    elif spec["gpus"]:
        res["gpu"] = spec["gpus"]
    if "partition" in spec:
        res["slurm_partition"] = spec["partition"]
    return res


def launcher(cfg: dict, rule: str) -> str:
    """The command that runs `-m rlhf <stage>`: python, torchrun with one rank per GPU of the job, or (nodes > 1)
    rlhf.launch, which starts one torchrun per node of the Slurm job.

    --standalone starts a local rendezvous on a free port, so several jobs on one node never collide.
    """
    spec = job_spec(cfg, rule)
    if STAGES[rule].data_parallel and spec["nodes"] > 1:
        return (f"python -m rlhf.launch --nodes {spec['nodes']} --gpus-per-node {spec['gpus']} "
                f"--cpus-per-node {spec['cpus']} --")
    if STAGES[rule].data_parallel and spec["gpus"] > 1:
        return f"torchrun --standalone --nproc-per-node {spec['gpus']}"
    return "python"
