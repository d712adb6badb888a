"""The paper rehearsal (rlhf/rehearsal): the overlay changes only what cannot exist here, and the CI subset of paper
configs runs end to end with every path exercised (`make rehearse` runs them all through the Slurm profile)."""
import json
import os
import subprocess
import sys

import pytest

from rlhf.config import _read_yaml, load_config, validate_config
from rlhf.errors import ConfigError
from rlhf.rehearsal.overlay import OVERLAID, UPDATE_COUNTS, changes, merged, overlay, standins_needed
from rlhf.rehearsal.run import CI_SUBSET, ci_slice, paper_configs, slice_targets
from rlhf.rehearsal.standins import HUB_MODELS, STANDINS
from rlhf.settings import GRPOSettings
from tests.conftest import REPO, jobs

FOLDERS = {k: f"/standins/{k}" for k in STANDINS}
HUB = {k: f"/hub/{k}" for k in ("tldr", "alpaca_farm", "gsm8k", "math")}
URL = "http://nodea:8000/v1"


def _matches(dotted: str, allowed: str) -> bool:
    a, b = dotted.split("."), allowed.split(".")
    return len(a) == len(b) and all(y == "<x>" or x == y for x, y in zip(a, b))


def generic(dotted: str) -> str:
    """A dotted field with rule, method, sweep and DPO-method names as <x> (as overlay.changes writes them)."""
    parts = dotted.split(".")
    return ".".join("<x>" if i and (parts[i - 1] in ("jobs", "methods", "sweeps") and parts[:i] != ["methods"] or
                                    parts[:i] in (["methods"], ["sweeps"], ["dpo", "methods"])) else p
                    for i, p in enumerate(parts))


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", paper_configs(), ids=lambda p: p.stem)
def test_the_overlay_changes_only_what_cannot_exist_here(path):
    """Every field the overlay sets is one of OVERLAID (models, dataset folder, judge URL, devices and ranks, the
    batches they scale, the step counts); after merging, every other field of the validated config is the paper's."""
    raw, cfg = _read_yaml(path), load_config(path)
    layer = overlay(raw, cfg, FOLDERS, HUB, URL)
    assert all(any(_matches(c, a) for a in OVERLAID) for c in changes(layer)), changes(layer)
    rehearsed = validate_config(merged(raw, layer), source=str(path))
    changed = set(changes(layer))
    paper = dict(_leaves(cfg))
    for dotted, value in _leaves(rehearsed):
        if generic(dotted) in changed or dotted.startswith("methods.") and dotted.rsplit(".", 1)[1] in \
                (*UPDATE_COUNTS, "prompts_per_step"):
            continue  # an overlaid field, or a sweep's method resolved from an overlaid base
        assert paper.get(dotted) == value, (dotted, paper.get(dotted), value)
    # the batch arithmetic: per-rank batch and accumulation kept, ranks > 1 for the data-parallel stages
    from rlhf.cluster import ranks
    for stage in ("sft", "grpo") if "rlvr" in cfg else ("sft", "rm", "grpo"):  # an RLVR experiment has no RM
        if cfg["resources"]["jobs"].get(stage, {}).get("gpus", 0) > 1:
            assert ranks(rehearsed, stage) == 2
            key = "prompts_per_step" if stage == "grpo" else "batch_size"
            section = "grpo" if stage == "grpo" else stage
            assert rehearsed[section][key] / 2 == cfg[section][key] / ranks(cfg, stage)


def test_the_overlay_of_a_signcert_config_field_by_field():
    path = REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml"
    layer = overlay(_read_yaml(path), load_config(path), FOLDERS, HUB, URL)
    assert changes(layer) == [
        "certify.noise_samples", "certify.num_prompts", "data.hub_name", "data.num_test", "ensemble.model",
        "gold.name", "grpo.checkpoint_every", "grpo.eval_prompts", "grpo.prompts_per_step", "grpo.steps", "model.name",
        "resources.device", "resources.jobs.<x>.cpus", "resources.jobs.<x>.gpus", "resources.jobs.<x>.mem_mb",
        "resources.jobs.<x>.nodes", "rm.batch_size", "sft.batch_size"]
    assert layer["model"]["name"] == FOLDERS["pythia"] and layer["ensemble"]["model"] == FOLDERS["pythia-small"]
    assert layer["sft"]["batch_size"] == 128 * 2 // 8 and layer["grpo"]["prompts_per_step"] == 32 * 2 // 8
    assert layer["resources"]["jobs"]["grpo"] == {"cpus": 1, "mem_mb": 3000, "gpus": 0, "nodes": 2}


def test_the_overlay_on_one_rank_keeps_the_per_device_batch():
    """ranks=1 (CI's SignCert slice, CI_RANKS): the data-parallel rules run as one process (no GPUs, no nodes: the
    launcher is python) with one rank's share of each global batch, and the validated config says so."""
    from rlhf.cluster import launcher, ranks
    from rlhf.rehearsal.run import CI_RANKS, CI_SUBSET
    assert set(CI_RANKS) <= set(CI_SUBSET)
    path = REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml"
    raw, cfg = _read_yaml(path), load_config(path)
    for local in (True, False):
        layer = overlay(raw, cfg, FOLDERS, HUB, URL, local=local, ranks=1)
        assert layer["sft"]["batch_size"] == 128 // 8 and layer["grpo"]["prompts_per_step"] == 32 // 8
        assert layer["resources"]["jobs"]["grpo"] == {"cpus": 1, "mem_mb": 3000, "gpus": 0}
        rehearsed = validate_config(merged(raw, layer), source=str(path))
        assert all(ranks(rehearsed, stage) == 1 and launcher(rehearsed, stage) == "python"
                   for stage in ("sft", "rm", "grpo"))


def test_every_hub_model_of_the_paper_configs_has_a_stand_in():
    names = set()
    for path in paper_configs():
        cfg = load_config(path)
        names |= {cfg["model"]["name"], cfg.get("ensemble", {}).get("model"),
                  cfg["gold"].get("name") if cfg["gold"]["type"] == "reward_model" else None}
        assert standins_needed(cfg)
    assert names - {None} <= set(HUB_MODELS)


def test_the_ci_subset_has_a_config_of_each_kind():
    """TL;DR, AlpacaFarm, GSM8K with the LLM judge, MATH, and SignCert-PO with its baselines."""
    kinds = [load_config(REPO / "config" / "paper" / f"{name}.yaml") for name in CI_SUBSET]
    assert {c["data"]["source"] for c in kinds} == {"tldr", "alpaca_farm", "gsm8k", "math"}
    assert any(c.get("rlvr", {}).get("reward") == "judge" for c in kinds)
    assert any({"uwo", "bspo"} <= set(c["methods"]) and any(m.startswith("signcert") for m in c["methods"])
               and any(m.startswith("advpo") for m in c["methods"]) for c in kinds)


def test_the_ci_slice_keeps_every_stage_and_method_kind_and_one_point_of_each_sweep(tmp_path):
    """CI rehearses a config with sweeps through every stage its whole DAG has but the report, with every method that
    is not a sweep point and the first point of each sweep; a config without sweeps whole."""
    path = REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml"
    cfg = load_config(path)
    kept = ci_slice(cfg)
    assert kept == ["drgrpo", "uwo", "bspo", "signcert-0.1", "advpo-1"]  # SignCert's q sweep, AdvPO's budget sweep
    assert ci_slice(load_config(REPO / "config" / "paper" / "gr-math-qwen2.5-1.5b.yaml")) is None
    judge = load_config(REPO / "config" / "paper" / "gr-gsm8k-judge-qwen2.5-0.5b.yaml")
    assert ci_slice(judge) is None and ci_slice(judge, "gr-gsm8k-judge-qwen2.5-0.5b") == ["kl"]  # CI_METHODS
    with pytest.raises(ConfigError, match=r"CI_METHODS\['gr-gsm8k-judge-qwen2.5-0.5b'\]: kl not among"):
        ci_slice({**judge, "methods": {"noreg": {}}}, "gr-gsm8k-judge-qwen2.5-0.5b")

    def dry(*targets):
        done = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                               str(tmp_path), "--configfile", str(path), "--cores", "1", "-n", *targets],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return jobs(done.stdout)
    whole, sliced = dry(), dry(*slice_targets(cfg, kept))
    assert set(sliced) == set(whole) - {"report", "all"}
    assert sliced["grpo"] == len(kept) < whole["grpo"] and sliced["evaluate"] == 2  # SFT's and the first method's



def test_the_ci_slices_rehearse_every_regularizer_and_reward_of_the_ci_subset():
    """What CI_METHODS leaves out is rehearsed elsewhere in the subset: every regularizer (KL, resets, GR, SignCert,
    Elastic Reset, none) and every reward kind a CI config's methods use runs in some config's slice."""
    def kinds(cfg, methods):
        out = set()
        for m in methods:
            s = GRPOSettings.for_method(cfg, m)
            on = {k for k, v in (("kl", s.kl_beta), ("resets", s.reset_every), ("gr", s.gr_gamma),
                                 ("signcert", s.signcert_quantile), ("elastic", s.elastic_reset_every)) if v}
            out |= (on or {"noreg"}) | {f"reward {s.reward}"}
        return out
    wanted, kept = set(), set()
    for name in CI_SUBSET:
        cfg = load_config(REPO / "config" / "paper" / f"{name}.yaml")
        wanted |= kinds(cfg, cfg["methods"])
        kept |= kinds(cfg, ci_slice(cfg, name) or cfg["methods"])
    assert kept == wanted and {"kl", "resets", "gr", "signcert", "noreg", "reward uwo"} <= kept, wanted - kept

@pytest.mark.slow
def test_the_ci_subset_of_paper_configs_rehearses_end_to_end(tmp_path):
    """`python -m rlhf.rehearsal --ci --local`: a config of each kind (CI_SUBSET) through the Snakefile, every stage,
    every regularizer once (ci_slice: one point of each sweep, CI_METHODS; the sliced configs run without their
    report; gr-math whole; local executor: the Slurm profile costs about twice as long; make rehearse goes through it, and
    tests/test_slurm.py runs micro DAG jobs on two Slurm nodes) with its checks (non-zero advantages and gradients,
    parseable judge, completions that end and carry their format, every policy moved, every report and paper-table
    cell filled). One test on one pytest-xdist worker: split over both workers (two files, two configs each) the
    suite took 31 min instead of 21 here, both halves' processes crowding the two cores from the start."""
    done = subprocess.run([sys.executable, "-m", "rlhf.rehearsal", "--ci", "--local", "--stage-server", "--out",
                           str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=3000,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads((tmp_path / "report.json").read_text()) if (tmp_path / "report.json").is_file() else {}
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:], report)
    assert [r["config"] for r in report["configs"]] == list(CI_SUBSET)  # in its order: those asking a judge last
    assert all(r["passed"] for r in report["configs"]), report
    # every GRPO run and its evaluation, beside data, SFT and SFT's evaluation at least (gsm8k-judge's slice: 5 jobs)
    assert all(r["jobs"] >= 2 * int(r["signals"]["grpo runs"]) + 3 for r in report["configs"]), report
    assert {r["config"] for r in report["configs"] if r["whole"]} == {"gr-math-qwen2.5-1.5b"}
    by_config = {r["config"]: r["signals"] for r in report["configs"]}
    assert float(by_config["gr-gsm8k-judge-qwen2.5-0.5b"]["judge parseable"]) >= 0.5
    assert report["tables"] and all(t["missing"] == 0 for t in report["tables"].values()), report["tables"]
