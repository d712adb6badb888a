"""Per-step metrics: always a local JSON-lines file, and a wandb run when wandb.enabled (offline by default).

Every training job (sft, rm, each grpo method x seed) is one wandb run: grouped by experiment, typed by stage,
with an id derived from the experiment and the job, so a preempted job that resumes continues the same run.
Offline runs are written under <results_dir>/<experiment>/wandb; `wandb sync` uploads them later. WANDB_MODE in
the environment wins over the config. Nothing secret is logged: the run config is the stage's settings with any
field whose name looks like a credential removed, and keys are only ever read from the environment.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from rlhf.errors import DataError
from rlhf.io import _finite

_CREDENTIAL = re.compile(r"(api_?key|token|secret|password)", re.I)


def wandb_id(experiment: str, job: str) -> str:
    """A valid, stable wandb run id (letters, digits, - _ .; at most 64 characters) for one job."""
    raw = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{experiment}-{job}")
    if len(raw) <= 64:
        return raw
    return f"{raw[:47]}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def public(config):
    """The run config without credential-like fields (at any depth)."""
    if isinstance(config, dict):
        return {k: public(v) for k, v in config.items() if not _CREDENTIAL.search(str(k))}
    if isinstance(config, (list, tuple)):
        return [public(v) for v in config]
    return config


def start_wandb(cfg: dict, job: str, job_type: str, run_config: dict | None):
    import wandb  # optional dependency: pip install -e '.[wandb]'

    w = cfg["wandb"]
    os.environ.setdefault("WANDB_MODE", w["mode"])
    folder = Path(w["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=w["project"], group=cfg["experiment"], job_type=job_type, name=job,
                     id=wandb_id(cfg["experiment"], job), resume="allow", dir=str(folder),
                     config=public(run_config or {}))
    # Our step is a metric and every chart's x axis, never wandb's own step: a job resumed from its step-k checkpoint
    # logs steps k+1.. again, and wandb drops a row whose own step is not above the last one it has, so passing
    # step= would lose the resumed trajectory's values there. With wandb's step left to count rows, nothing is dropped;
    # the rows of the abandoned attempt stay, told apart by `resume/attempt`.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _complete_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, parsed) for every line of a metrics file. A SIGKILL can cut the last line short: that one is
    dropped; an unreadable line before the end is corruption and an error naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path}:{i + 1}: not valid JSON, and not the torn last line of a killed run") from None
    return out


class MetricsLog:
    """Appends one JSON line per write. On resume from step k, lines after step k are dropped first,
    so a resumed run's file reads exactly like an uninterrupted one. A context manager: leaving it by an exception
    closes it as failed."""

    def __init__(self, path: Path, resume_step: int = 0, cfg: dict | None = None, run_name: str = "",
                 run_config: dict | None = None, job_type: str = "grpo"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.is_file():
            kept = [line for line, row in _complete_lines(self.path) if row["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._wandb, self._attempt = None, {}
        if (cfg or {}).get("wandb", {}).get("enabled"):
            self._wandb = start_wandb(cfg, run_name, job_type, run_config)
            if resume_step:
                self._attempt = {"resume/from_step": resume_step}

    def write(self, step: int, metrics: dict) -> None:
        self._file.write(json.dumps(_finite({"step": step, **metrics})) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({"step": step, **metrics, **self._attempt})

    def summary(self, metrics: dict) -> None:
        """Final numbers of the job (wandb run summary; the stage writes its own metrics file)."""
        if self._wandb is not None:
            self._wandb.summary.update(_finite(metrics))

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Idempotent: the first call ends the wandb run (failed or not)."""
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)  # a failed job's run ends now; its rerun resumes it
            self._wandb = None


def write_trainer_log(path: Path, log_history: list[dict], cfg: dict, job: str, run_config: dict,
                      summary: dict | None = None) -> None:
    """An HF Trainer's log history as a metrics file (and the job's wandb run)."""
    log = MetricsLog(path, cfg=cfg, run_name=job, run_config=run_config, job_type=job)
    for entry in log_history:
        log.write(entry.get("step", 0), {k: v for k, v in entry.items() if k != "step"})
    log.summary(summary or {})
    log.close()
