"""The Snakemake DAG on the micro config: whole run, dry run, and what --forcerun rm reruns."""
import subprocess

import pytest

from tests.conftest import REPO, SNAKEMAKE, jobs, snakemake, write_config


@pytest.mark.slow
def test_whole_dag_on_micro_config(micro_snakemake):
    cfg, dry, run = micro_snakemake
    assert dry.returncode == 0, dry.stderr
    assert jobs(dry.stdout) == {"data": 1, "base": 1, "sft": 1, "sample": 1, "label": 1, "rm": 1,
                                "grpo": 5, "evaluate": 6, "certify": 1, "report": 1, "all": 1}
    assert run.returncode == 0, run.stderr[-3000:]
    report = cfg.parent / "results" / "micro" / "report"
    assert (report / "table.csv").is_file() and (report / "rewards_vs_step.png").is_file()

    nothing = snakemake(cfg, "-n")
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

    forced = snakemake(cfg, "-n", "--forcerun", "rm")
    assert forced.returncode == 0, forced.stderr
    assert jobs(forced.stdout) == {"rm": 1, "grpo": 5, "evaluate": 6, "certify": 1, "report": 1, "all": 1}


def test_snakemake_config_error_names_the_field(tmp_path):
    cfg = write_config(tmp_path, grpo={"stepz": 1})
    out = snakemake(cfg, "-n")
    assert out.returncode != 0
    assert "unknown key grpo.stepz" in out.stdout + out.stderr


PAPER_CONFIGS = sorted(p for p in (REPO / "config" / "paper").glob("*.yaml") if not p.name.endswith(".base.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_builds_its_dag(path, tmp_path):
    """Every paper experiment's DAG builds through the Slurm profile (dry run): no base model to build,
    methods x seeds policies, and GPU rules that never set `tasks`."""
    from rlhf.config import load_config
    cfg = load_config(path)
    out = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(path), "-n",
                          "--profile", str(REPO / "profiles" / "slurm")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = len(cfg["methods"]) * len(cfg["seeds"])
    assert jobs(out.stdout) == {"data": 1, "sft": 1, "sample": 1, "label": 1, "rm": 1, "grpo": runs,
                                "evaluate": runs + 1, "certify": 1, "report": 1, "all": 1}


def test_rule_resources_come_from_the_config(tmp_path):
    from rlhf.cluster import snakemake_resources
    from rlhf.config import load_config
    cfg = load_config(REPO / "config" / "paper" / "gr-tldr-pythia-1b.yaml")
    assert snakemake_resources(cfg, "grpo") == {"mem_mb": 256000, "runtime": 2880, "cpus_per_task": 32, "gpu": 8}
    assert "gpu" not in snakemake_resources(cfg, "report")
    alpaca = load_config(REPO / "config" / "paper" / "gr-alpaca-qwen2.5-3b.yaml")
    assert "gpu" not in snakemake_resources(alpaca, "label")  # the API judge needs no GPU
    for rule in ("data", "sft", "sample", "label", "rm", "grpo", "evaluate", "certify", "report"):
        assert not {"tasks", "tasks_per_gpu"} & set(snakemake_resources(cfg, rule))
    dry = snakemake(write_config(tmp_path, resources={"jobs": {"grpo": {"cpus": 2, "mem_mb": 1234}}}), "-n")
    assert "cpus_per_task=2, mem_mb=1234" in dry.stdout


def test_multi_gpu_grpo_runs_under_torchrun(tmp_path):
    """A GRPO job with several GPUs starts one rank per GPU; everything else (and one GPU) is one process."""
    from rlhf.cluster import launcher
    from rlhf.config import load_config
    cfg = load_config(REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml")
    assert launcher(cfg, "grpo") == "torchrun --standalone --nproc-per-node 8"
    assert launcher(cfg, "sft") == launcher(cfg, "rm") == launcher(cfg, "grpo")
    assert launcher(cfg, "sample") == launcher(cfg, "evaluate") == "python"
    two = write_config(tmp_path, resources={"jobs": {"grpo": {"gpus": 2}}})
    dry = snakemake(two, "-n", "-p", str(tmp_path / "results" / "micro" / "grpo" / "noreg" / "seed0" / "policy"))
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "torchrun --standalone --nproc-per-node 2 -m rlhf grpo" in dry.stdout
    odd = write_config(tmp_path, resources={"jobs": {"grpo": {"gpus": 3}}})
    bad = snakemake(odd, "-n")
    assert bad.returncode != 0 and "does not split over the 3 GPUs" in bad.stdout + bad.stderr


def test_conda_environments_agree_with_pyproject():
    """The rules' conda envs pin what vllm 0.33 needs (torch 2.14.0 on GPU, transformers <5.21 everywhere)."""
    import tomllib

    import yaml
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    transformers = next(d for d in deps if d.startswith("transformers"))
    for name, torch_pin in (("cpu", "torch==2.13.0"), ("gpu", "torch==2.14.0")):
        env = yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert torch_pin in pip and transformers in pip and "-e .." in pip, name
    assert "vllm==0.33.*" in pip
