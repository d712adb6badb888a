"""Per-step metrics: always a local metrics.jsonl, and wandb when enabled (offline by default)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf.io import _finite


class MetricsLog:
    """Appends one JSON line per write. On resume from step k, lines after step k are dropped first,
    so a resumed run's file reads exactly like an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int = 0, cfg: dict | None = None, run_name: str = "",
                 run_config: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._wandb = None
        w = (cfg or {}).get("wandb", {})
        if w.get("enabled"):
            import wandb
            os.environ.setdefault("WANDB_MODE", w["mode"])
            # A deterministic id lets a resumed job continue the same wandb run.
            self._wandb = wandb.init(project=w["project"], group=cfg["experiment"], name=run_name,
                                     id=f"{cfg['experiment']}-{run_name}", resume="allow", config=run_config)

    def write(self, step: int, metrics: dict) -> None:
        self._file.write(json.dumps(_finite({"step": step, **metrics})) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
