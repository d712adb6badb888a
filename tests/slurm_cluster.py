"""A real single-node Slurm (22.05, Debian's slurm-wlm) for the tests: munged, slurmctld and slurmd on localhost.

State and logs live in one temporary folder. The config is written to /etc/slurm/slurm.conf (job steps
started inside a job, e.g. srun by Snakemake's jobstep executor, only look there) and removed again, so the
helper refuses to run where a slurm.conf already exists. Only daemons this helper started are stopped.
Needs root (the daemons run as root here).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def why_unavailable() -> str | None:
    """None when a local Slurm can be started here, else the reason (the test is skipped with it)."""
    if os.geteuid() != 0:
        return "needs root to start munged, slurmctld and slurmd"
    if SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} exists: this machine has a configured Slurm, which the test will not touch"
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        if not shutil.which("apt-get"):
            return "slurm-wlm and munge are not installed and there is no apt-get"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        out = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            out = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {out.stderr.strip()[-300:]}"
    return None


def _node_line() -> str:
    """This machine's NodeName line as slurmd sees its hardware (a mismatch would drain the node)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return line + " NodeAddr=127.0.0.1 State=UNKNOWN"


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = SYSTEM_CONF
        self.started: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        node = _node_line()
        name = node.split()[0].split("=")[1]
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=rlhfci
SlurmctldHost={name}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
{node}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, *cmd: str) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}.out", "w")
        self.started.append(subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            self._daemon("munged", "--foreground", "--force")
        self._daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._daemon("slurmd", "-D", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"local Slurm did not come up: sinfo says {out.stdout.strip() or out.stderr.strip()!r}; "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.started.clear()
        self.conf.unlink(missing_ok=True)

    def submitted_jobs(self) -> int:
        """Batch jobs slurmctld accepted (from its log: one line per sbatch)."""
        log = (self.root / "slurmctld.log").read_text()
        return log.count("_slurm_rpc_submit_batch_job: JobId=")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
