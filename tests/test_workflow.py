"""The Snakemake DAG on the micro config: whole run, dry run, and what --forcerun rm reruns."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_config

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


def snakemake(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(cfg.parent), "--configfile", str(cfg), *args],
                          capture_output=True, text=True, timeout=600)


def jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.mark.slow
def test_whole_dag_on_micro_config(tmp_path):
    cfg = write_config(tmp_path)
    dry = snakemake(cfg, "-n")
    assert dry.returncode == 0, dry.stderr
    assert jobs(dry.stdout) == {"data": 1, "base": 1, "sft": 1, "sample": 1, "label": 1, "rm": 1,
                                "grpo": 5, "evaluate": 6, "certify": 1, "report": 1, "all": 1}
    start = time.perf_counter()
    run = snakemake(cfg)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    assert elapsed < 120, f"micro DAG took {elapsed:.0f}s"
    report = tmp_path / "results" / "micro" / "report"
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
    """Every paper experiment's DAG builds (dry run): no base model to build, methods x seeds policies."""
    from rlhf.config import load_config
    cfg = load_config(path)
    out = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(path), "-n"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = len(cfg["methods"]) * len(cfg["seeds"])
    assert jobs(out.stdout) == {"data": 1, "sft": 1, "sample": 1, "label": 1, "rm": 1, "grpo": runs,
                                "evaluate": runs + 1, "certify": 1, "report": 1, "all": 1}
