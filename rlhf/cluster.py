"""What each rule asks a cluster for, from the experiment config (read by the Snakefile).

`launcher` is how a rule starts its stage: one process, or, for a data-parallel stage (sft, rm, grpo) on a job
with several GPUs, torchrun with one rank per GPU on the job's node (rlhf/distributed.py).

Resource names are those snakemake-executor-plugin-slurm maps to sbatch flags: `gpu` (--gpus), `cpus_per_task`,
`mem_mb`, `runtime` (minutes), `slurm_partition`. GPU rules never set `tasks`: the plugin (2.x) would turn it
into --ntasks-per-gpu and start the job once per task.
"""
from __future__ import annotations

from rlhf.registry import STAGES

BUILTIN = {"gpus": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60}


def job_spec(cfg: dict, rule: str) -> dict:
    jobs = cfg["resources"]["jobs"]
    return {**BUILTIN, "cpus": STAGES[rule].cpus, **jobs.get("default", {}), **jobs.get(rule, {})}


def snakemake_resources(cfg: dict, rule: str) -> dict:
    spec = job_spec(cfg, rule)
    res = {"mem_mb": spec["mem_mb"], "runtime": spec["runtime"], "cpus_per_task": spec["cpus"]}
    if spec["gpus"]:
        res["gpu"] = spec["gpus"]
    if "partition" in spec:
        res["slurm_partition"] = spec["partition"]
    return res


def launcher(cfg: dict, rule: str) -> str:
    """The command that runs `-m rlhf <stage>`: python, or torchrun with one rank per GPU of the job.

    --standalone starts a local rendezvous on a free port, so several jobs on one node never collide.
    """
    gpus = job_spec(cfg, rule)["gpus"]
    if STAGES[rule].data_parallel and gpus > 1:
        return f"torchrun --standalone --nproc-per-node {gpus}"
    return "python"
