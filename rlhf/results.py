"""An experiment's finished results as a table cell reads them (rlhf/tables.py renders cells, rlhf/figures.py plots
them): which runs and files a cell names, a method's value per seed, pooled replicas, early stopping's checkpoint."""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import load_config
from rlhf.errors import ConfigError, RLHFError
from rlhf.paths import Paths
from rlhf.registry import SFT_BASELINE, dpo_methods

REPO = Path(__file__).resolve().parents[1]


def select_checkpoint(steps: list[int], values: list[float]) -> int:
    """Early stopping: the step with the highest held-out value; the earliest among ties (less optimization for the
    same measured quality)."""
    if not steps:
        raise ValueError("no evaluation steps to select from")
    best = max(values)
    return min(s for s, v in zip(steps, values) if v == best)


@dataclass
class CellResult:
    values: list[float] = field(default_factory=list)   # one per seed found (scaled)
    steps: list[int] = field(default_factory=list)      # early stopping: the selected step per seed
    missing: list[str] = field(default_factory=list)    # files not there
    n: int | None = None                                # when the source reports n itself (difficulty)
    method: str = ""                                    # the method read
    chosen_of: int = 1                                  # > 1: the best of that many matching methods
    empty: bool = False                                 # the source has the cell but nothing in it (an empty bin)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof 1; 0 for one seed)."""
        if len(self.values) < 2:
            return 0.0 if self.values else None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))


def resolve(path: str | Path) -> Path:
    """A spec's or experiment's path as given when it exists from here, else from the repository root (so a run with
    --directory elsewhere still finds config/...)."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() else REPO / path


def experiment_config(path: Path) -> dict:
    return load_config(resolve(path))


def methods_of(cell: dict, cfg: dict) -> list[str]:
    """The experiment's methods a cell's `method` names (a name, a glob pattern or a list of either), in order."""

    known = [SFT_BASELINE, *cfg["methods"], *dpo_methods(cfg)]
    patterns = cell["method"] if isinstance(cell["method"], list) else [cell["method"]]
    found = [m for m in known if any(fnmatch.fnmatchcase(m, str(p)) for p in patterns)]
    if not found:
        raise ConfigError(f"method {cell['method']!r} matches no method of experiment {cell['experiment']} "
                          f"(it has: {', '.join(known)})")
    return found


def cell_files(cell: dict, cfg: dict) -> list[tuple[int | None, Path]]:
    """(seed, path) pairs a cell reads (an evaluation folder, a metrics log, ...), for every method it names: the same
    function declares the Snakemake inputs and reads them."""
    P = Paths.from_config(cfg)
    if cell["source"] == "bench":
        return [(None, P.root / "bench" / "bench.json")]
    if cell["source"] == "difficulty":
        return [(None, P.report)]  # the report folder's difficulty.csv
    return [f for method in methods_of(cell, cfg) for f in _run_files(P, cell, cfg, method)]


def _run_files(P, cell: dict, cfg: dict, method: str) -> list[tuple[int | None, Path]]:
    if method == SFT_BASELINE:
        return [(cfg["seed"], P.evaluation(SFT_BASELINE, cfg["seed"]))]
    # a DPO policy has no training-time evaluation: its final one
    training = cell["source"] == "training" or cell["selection"] == "early_stopping"
    training = training and method not in dpo_methods(cfg)
    return [(s, P.grpo_metrics(method, s) if training else P.evaluation(method, s)) for s in cfg["seeds"]]


def _curve(path: Path, key: str) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not points:
        raise RLHFError(f"{path}: no {key!r} in any line (metrics of another kind of run?)")
    return [s for s, _ in points], [v for _, v in points]


def read_cell(cell: dict, cfgs: list[dict]) -> CellResult:
    """A cell's values over its experiment's replicas (`cfgs`, pooled as seeds); for several matching methods, the
    one with the best mean (complete ones first)."""
    if cell["source"] in ("bench", "difficulty"):
        return pooled([read_method(cell, cfg) for cfg in cfgs])
    results = [pooled([read_method({**cell, "method": m}, cfg) for cfg in cfgs]) for m in methods_of(cell, cfgs[0])]
    if len(results) == 1:
        return results[0]
    best = max(results, key=lambda r: (not r.missing, r.mean if r.mean is not None else -math.inf))
    if best.values:
        best.chosen_of = len(results)
    return best


def pooled(results: list[CellResult]) -> CellResult:
    """One experiment's replicas as one cell: their seeds' values together."""
    if len(results) == 1:
        return results[0]
    out = CellResult(method=results[0].method, n=None if any(r.n is None for r in results) else
                     sum(r.n for r in results), empty=all(r.empty for r in results))
    for r in results:
        out.values += r.values
        out.steps += r.steps
        out.missing += r.missing
    return out


def read_method(cell: dict, cfg: dict) -> CellResult:
    out = CellResult(method=cell["method"])
    for seed, path in cell_files(cell, cfg):
        if not path.exists():
            out.missing.append(str(path))
            continue
        source, metric = cell["source"], cell.get("metric")
        if source == "bench":
            result = json.loads(path.read_text())["results"].get(cell["method"])
            if result is None:
                out.missing.append(f"{path} (no method {cell['method']!r})")
                continue
            value = result[metric]
        elif source == "difficulty":
            if not (path / "difficulty.csv").is_file():
                out.missing.append(f"{path / 'difficulty.csv'} (an RLVR report with type and level)")
                continue
            rows = list(csv.DictReader(io.StringIO((path / "difficulty.csv").read_text())))
            match = [r for r in rows if r["method"] == cell["method"] and r["bin"] == str(cell["bin"])]
            if match and int(match[0]["groups"]) == 0:
                out.empty = True  # no question group started in this bin: nothing to report, nothing missing
                continue
            if not match or match[0].get(str(cell["step"])) in (None, ""):
                out.missing.append(f"{path} ({cell['method']}, bin {cell['bin']}, step {cell['step']})")
                continue
            value, out.n = float(match[0][str(cell["step"])]), int(match[0]["seeds"])
        elif path.is_dir():  # an evaluation folder
            value = json.loads((path / "metrics.json").read_text())[metric]
        elif source == "training":
            steps, values = _curve(path, metric)
            value = sum(values) / len(values) if cell["reduce"] == "mean" else values[-1]
        else:  # early stopping on the training-time select_on metric; report the held-out metric at that step
            steps, wins = _curve(path, f"eval/{cell['select_on']}")
            step = select_checkpoint(steps, wins)
            value = dict(zip(*_curve(path, f"eval/{metric}")))[step]
            out.steps.append(step)
        out.values.append(float(value) * cell["scale"])
    return out
