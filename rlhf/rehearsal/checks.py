"""What a rehearsed experiment must show for its paths to count as exercised, not just its plumbing.

A DAG can finish with every reward equal (completions that never end, a judge whose every reply is unparseable), so
every advantage, gradient and policy update is zero and every method's row equals SFT's. Each check below fails such
a run, naming the method or stage:
- GRPO: each run has steps with a non-zero advantage (groups whose rewards differ), a non-zero gradient norm at each
  such step and no NaN; its final policy differs from the SFT policy (so do the DPO-family policies);
- completions end: the SFT policy's evaluation completions average under 95% of the length cap; RLVR completions
  carry their format (tags, steps) at some step;
- labels: the gold preferred the first sample of a pair for some pairs and the second for others; an API judge
  answered a parseable label for at least PARSEABLE_FLOOR of the pairs;
- RLVR judge reward: at least PARSEABLE_FLOOR of the judge's replies parsed, and its correctness term varied;
- the experiment's report table has every method's mean filled (where the whole DAG ran).
"""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from rlhf.config import load_config
from rlhf.figures import is_figure
from rlhf.paths import Paths
from rlhf.registry import SFT_BASELINE, dpo_methods
from rlhf.rehearsal.overlay import STEPS
from rlhf.tables import experiments_of, load_spec
from safetensors.torch import load_file

PARSEABLE_FLOOR = 0.5


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def failed_jobs(log: Path) -> list[str]:
    """The rules Snakemake reported as failed in its log (`Error in rule X:`)."""
    text = Path(log).read_text() if Path(log).is_file() else ""
    return sorted(set(re.findall(r"Error in rule (\w+):", text)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def max_change(folder: Path, reference: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference of any weight between a model folder and the reference's weights."""
    mine = weights(folder)
    return max((mine[k].float() - v.float()).abs().max().item() for k, v in reference.items() if k in mine)


def check_experiment(root: Path, cfg: dict, methods: list[str] | None = None) -> tuple[list[str], dict]:
    """(problems, signals) of one experiment's results folder; methods: the GRPO methods that ran, where not all of
    them did (a CI slice: then no report either)."""
    P, problems, signals = Paths(Path(root)), [], {}
    runs = [(m, s) for m in (cfg["methods"] if methods is None else methods) for s in cfg["seeds"]]
    nonzero, min_grad, unparseable, correctness = [], math.inf, [], []
    for m, s in runs:
        steps = [r for r in _jsonl(P.grpo_metrics(m, s)) if "grad_norm" in r]
        fractions = [r["advantage/nonzero_fraction"] for r in steps]
        nonzero += fractions
        if not steps or max(fractions) == 0:
            problems.append(f"grpo {m} seed {s}: every advantage was zero (all rewards of every group equal)")
        grads = [r["grad_norm"] for r in steps]
        min_grad = min([min_grad, *(g for g, f in zip(grads, fractions) if f > 0)])
        if any(math.isnan(g) or (f > 0 and g <= 0) for g, f in zip(grads, fractions)):
            problems.append(f"grpo {m} seed {s}: a NaN gradient norm, or zero where advantages were not ({grads})")
        if cfg.get("rlvr", {}).get("reward") == "judge":
            unparseable += [r.get("judge/unparseable_fraction", 1.0) for r in steps]
            correctness += [r.get("reward/judge_correctness") for r in steps]
    signals["grpo runs"] = len(runs)
    if nonzero:
        signals["advantage nonzero"] = f"{min(nonzero):.2f}-{max(nonzero):.2f}"
        signals["min grad norm"] = f"{min_grad:.2g}"
    if unparseable:
        parsed = 1 - sum(unparseable) / len(unparseable)
        signals["judge parseable"] = f"{parsed:.2f}"
        if parsed < PARSEABLE_FLOOR:
            problems.append(f"the RLVR judge's replies parsed for {parsed:.0%} (floor {PARSEABLE_FLOOR:.0%})")
        if len(set(correctness)) < 2:
            problems.append(f"the judge's correctness reward never varied ({sorted(set(correctness))})")

    # completions that end: the SFT policy's evaluation completions shorter than the length cap on average; RLVR answers
    # that carry their tags (a format term above zero at some step)
    cap = cfg["evaluate"]["max_new_tokens"]
    length = json.loads((P.evaluation(SFT_BASELINE, cfg["seed"]) / "metrics.json").read_text())["length"]
    signals["SFT length / cap"] = f"{length / cap:.2f}"
    if length >= 0.95 * cap:
        problems.append(f"evaluate sft: completions average {length:.0f} of {cap} tokens: they do not end (no EOS)")
    if "rlvr" in cfg:
        formats = [r.get(k, 0) for m, s in runs for r in _jsonl(P.grpo_metrics(m, s))
                   for k in ("reward/soft_format", "reward/format") if k in r]
        signals["format reward max"] = f"{max(formats, default=0):.2f}"
        if not formats or max(formats) <= 0:
            problems.append("grpo: no completion ever carried the answer format (its tags / steps): the format "
                            "reward was zero throughout")

    sft = weights(P.sft)
    policies = [(f"grpo {m} seed {s}", P.policy(m, s)) for m, s in runs]
    policies += [(f"dpo {m} seed {s}", P.dpo_policy(m, s)) for m in dpo_methods(cfg) for s in cfg["seeds"]]
    unchanged = [name for name, folder in policies if max_change(folder, sft) == 0]
    signals["policies changed"] = f"{len(policies) - len(unchanged)}/{len(policies)}"
    problems += [f"{name}: the policy equals the SFT policy" for name in unchanged]

    if "rlvr" not in cfg:
        pairs, labels = _jsonl(P.samples), _jsonl(P.labels)
        by_pair = {(p["prompt"], p["a"], p["b"]) for p in pairs}
        first = sum((r["prompt"], r["chosen"], r["rejected"]) in by_pair for r in labels)
        signals["labels"] = f"{len(labels)}/{len(pairs)}, first preferred {first / max(len(labels), 1):.2f}"
        if not 0 < first < len(labels):
            problems.append(f"label: the gold preferred the {'first' if first else 'second'} sample of every pair")
        if cfg["gold"]["type"] == "openai" and len(labels) < PARSEABLE_FLOOR * len(pairs):
            problems.append(f"label: the judge gave a parseable answer for {len(labels)} of {len(pairs)} pairs")

    if methods is not None:
        return problems, signals
    table = pd.read_csv(P.report / "table.csv")
    means = [c for c in table.columns if c.endswith("_mean")]
    empty = [f"{row['method']}.{c}" for _, row in table.iterrows() for c in means if pd.isna(row[c])]
    expected = {SFT_BASELINE, *cfg["methods"], *dpo_methods(cfg)}
    missing = expected - set(table["method"])
    signals["report cells"] = f"{table[means].notna().sum().sum()}/{table[means].size}"
    if empty or missing:
        problems.append(f"report: empty cells {empty[:5]} or missing methods {sorted(missing)}")
    return problems, signals


def paper_tables(out: Path, rehearsed: list[str]) -> dict[str, dict]:
    """Render every paper table spec (config/tables/paper) from the rehearsed results; per table, how many of the cells
    that the rehearsal can fill are filled (an empty difficulty bin, one no question group fell in, is not missing): cells whose experiments (every replica) were rehearsed, that do not read
    make bench's timings (not part of the DAG) and do not ask for a step past the rehearsal's last. The specs read
    results where the experiment config puts them (results/<experiment>), so each rehearsed experiment's folder is
    linked there under one results root."""
    repo = Path(__file__).resolve().parents[2]
    root = Path(out) / "tables-root"
    (root / "results").mkdir(parents=True, exist_ok=True)
    names = set()
    for name in rehearsed:
        cfg = load_config(repo / "config" / "paper" / f"{name}.yaml")
        names.add(Path(f"config/paper/{name}.yaml"))
        link = root / "results" / cfg["experiment"]
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(out) / "runs" / name / cfg["results_dir"] / cfg["experiment"], target_is_directory=True)
    summary = {}
    for spec_path in sorted((repo / "config" / "tables" / "paper").glob("*.yaml")):
        if is_figure(spec_path):
            continue
        spec = load_spec(spec_path)
        cells = {(r, c) for r, c, cell in spec.cells() if set(experiments_of(cell)) <= names
                 and cell["source"] != "bench" and not (cell["source"] == "difficulty" and cell["step"] > STEPS)}
        if not cells:
            continue
        done = subprocess.run([sys.executable, "-m", "rlhf.tables", str(spec_path), "--out", str(Path(out) / "tables")],
                              cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            summary[spec.name] = {"filled": 0, "cells": len(cells), "missing": len(cells), "error": done.stderr[-500:]}
            continue
        with open(Path(out) / "tables" / f"{spec.name}.csv") as f:
            rendered = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
        missing = sorted(k for k in cells if rendered[k]["missing"])
        empty = sum(1 for k in cells if not rendered[k]["missing"] and rendered[k]["mean"] == "")  # an empty bin
        summary[spec.name] = {"filled": len(cells) - len(missing) - empty, "empty": empty, "cells": len(cells),
                              "missing": len(missing),
                              **({"missing_cells": [" | ".join(k) for k in missing]} if missing else {})}
    return summary
