"""The one list of stages: what each reads and writes, which settings determine its output, what it asks a cluster
for. Used by the CLI (`python -m rlhf --help`), the Snakefile (each rule's input, output, params and shell command)
and rlhf/cluster.py (default resources).

A stage receives exactly its files and a *view* of the config: the fields listed in `settings` (its rerun trigger in
Snakemake: a changed field reruns the stage and what depends on it, nothing else) plus the side settings below, which
change how a stage reports or talks to an API but not what it produces (they never rerun anything). A stage that reads
a field outside its view fails with KeyError in every run, so a missing declaration cannot go unnoticed.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf.data.rlvr import rlvr_task
from rlhf.errors import ConfigError
from rlhf.paths import Paths
from rlhf.rewards.kinds import REWARDS, kinds_of, reward_kind
from rlhf.settings import DPOSettings, GRPOSettings

SFT_BASELINE = "sft"  # the `evaluate` method name of the SFT policy itself: a baseline row of the report

# Fields that never change an artifact: logging, and how the judge client paces, retries and pays for requests
# (its answers are cached by request content). Passed to every stage, excluded from every rerun trigger.
SIDE_SETTINGS = ("experiment", "wandb", "resources.threads", *(f"gold.judge.{k}" for k in (
    "cache", "api_key_env", "concurrency", "requests_per_minute", "timeout", "max_attempts", "max_backoff",
    "budget_usd", "prices", "batch_api", "batch_discount", "batch_max_requests", "batch_max_tokens",
    "batch_poll_seconds")))

MODEL = ("model.dtype", "model.pad_token", "resources.device")   # how a stage loads the project's models
GOLD = ("gold", "data.source", "data.miniature", "seed")   # the gold (scores, labels, judge requests)
PROXY = ("rm.batch_size_scoring",)
RLVR = ("rlvr",)  # absent from RLHF configs, so their views (and caches) do not change with it

Files = Callable[..., dict]  # (paths, cfg, method or member k, seed) -> {name: path or [paths]}


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    settings: tuple[str, ...] = ()          # dotted config fields the output depends on
    inputs: Files = lambda P, cfg, *_: {}
    outputs: Files = lambda P, cfg, *_: {}
    work: Files = lambda P, cfg, *_: {}     # resumable state a stage keeps between attempts (not a Snakemake output:
    #                                         Snakemake deletes the outputs of a failed job before its next attempt)
    per_run: bool = False                   # one job per (method, seed)
    per_member: bool = False                # one job per ensemble member k (its --member; rlhf/stages/<module>.py)
    module: str | None = None               # the stage module that runs it, when not its own name
    data_parallel: bool = False             # torchrun with one rank per GPU when its job has several
    tool: bool = False                      # a command beside the DAG, not a rule (reads the whole config)
    many: tuple[str, ...] | Callable[[str], bool] = ()  # inputs that are a list of paths (one per method and seed)
    priority: int = 0                       # Snakemake's (higher first when jobs wait for cores): 6 for what the
    #                                         policies wait on (a late RM would leave its GRPO runs to end the DAG
    #                                         alone), 5 for the long trainings per run (the short evaluations fill
    #                                         the cores at the end), 10 for certify (beside the first GRPO jobs
    #                                         instead of idling a core at the end)

    def is_list(self, name: str) -> bool:
        return self.many(name) if callable(self.many) else name in self.many


def _data_inputs(P, cfg, method, seed):
    """data.source jsonl: the user's files are inputs (an edited file reruns data); other sources are named."""
    return {k: Path(cfg["data"][k]) for k in ("train_file", "test_file") if cfg["data"]["source"] == "jsonl"}


def _validation(P, cfg) -> dict:
    return {"validation": P.validation} if cfg["data"].get("num_validation") else {}


def _data_outputs(P, cfg, method, seed):
    return {"train": P.train, "test": P.test, **_validation(P, cfg)}


def _sft_inputs(P, cfg, method, seed):
    return {"train": P.train, **({"base": P.base} if "build" in cfg["model"] else {})}


def ensemble_members(cfg: dict) -> list[int]:
    """UWO's ensemble members k = 1..K (none without an ensemble section)."""
    return list(range(1, cfg["ensemble"]["members"] + 1)) if "ensemble" in cfg else []


GRPO_INPUTS = ("train", "test", "validation", "sft")  # a GRPO run's own inputs; every other one is its reward kind's


def _grpo_inputs(P, cfg, method, seed):
    """The training prompts, the held-out ones (and the validation ones) and the SFT policy, then what the method's
    reward kind reads (rlhf/rewards/kinds.py; each a list of paths)."""
    kind = reward_kind(GRPOSettings.for_method(cfg, method).reward) if method in cfg["methods"] else None
    return {"train": P.train, "test": P.test, **_validation(P, cfg), "sft": P.sft,
            **(kind.inputs(P, cfg) if kind else {})}


def _reward_input(name: str) -> bool:
    """grpo's list inputs: every input of a reward kind."""
    return name not in GRPO_INPUTS


def used_stages(cfg: dict) -> list[str]:
    """The stages the experiment's DAG runs: the reward kinds' own only where a method trains on the kind."""
    rlvr, wanted = "rlvr" in cfg, {stage for kind in kinds_of(cfg) for stage in kind.stages}
    reward_stages = {stage for kind in REWARDS.values() for stage in kind.stages}
    used = {"base": "build" in cfg["model"], "sample": not rlvr, "label": not rlvr, "rm": not rlvr,
            "dpo": bool(dpo_methods(cfg)), "certify": not rlvr, "mechanisms": mechanisms_on(cfg)}
    return [name for name, st in STAGES.items() if not st.tool
            and (name in wanted if name in reward_stages else used.get(name, True))]


def _member_inputs(P, cfg, k, _):
    """A member starts from the SFT policy, or from ensemble.model (a hub id or folder: named in its view)."""
    return {"labels": P.labels, **({"sft": P.sft} if cfg["ensemble"]["model"] is None else {})}


def dpo_methods(cfg: dict) -> list[str]:
    """The DPO-family methods (config dpo.methods), trained by the dpo stage instead of grpo."""
    return list(cfg.get("dpo", {}).get("methods", {}))


def _eval_inputs(P, cfg, method, seed):
    policy = (P.sft if method == SFT_BASELINE else P.dpo_policy(method, seed) if method in dpo_methods(cfg)
              else P.policy(method, seed))
    return {"policy": policy, "sft": P.sft, **({} if rlvr_task(cfg) else {"rm": P.rm}), "test": P.test}


def _grpo_outputs(P, cfg, method, seed):
    """An RLVR run also keeps which held-out questions it solved at each evaluation (the difficulty table's input);
    where any method sets grpo.rollouts_every, every run has a rollouts file (what its policy wrote; empty where its
    method keeps none): a rule's outputs cannot differ by method."""
    rollouts = any(GRPOSettings.for_method(cfg, m).rollouts_every for m in cfg["methods"])
    return {"policy": P.policy(method, seed), "metrics": P.grpo_metrics(method, seed),
            **({"heldout": P.grpo_heldout(method, seed)} if rlvr_task(cfg) else {}),
            **({"rollouts": P.grpo_rollouts(method, seed)} if rollouts else {})}


def mechanisms_on(cfg: dict) -> bool:
    return bool(cfg.get("mechanisms", {}).get("method")) and not rlvr_task(cfg)


MECHANISM_KINDS = ("uwo", "advpo", "bspo")  # the reward kinds whose own signal the mechanisms stage reads


def _mechanism_inputs(P, cfg, *_):
    """The diagnosed method's rollouts (every seed), the SFT policy's labelled completions (the exploit thresholds),
    the proxy RM, and what the experiment's methods' signals read: UWO's members, AdvPO's M_D^-1, BSPO's ScoreLM."""
    extra = {name: paths for kind in kinds_of(cfg) if kind.name in MECHANISM_KINDS
             for name, paths in kind.inputs(P, cfg).items() if name != "rm"}
    method = cfg["mechanisms"]["method"]
    return {"rollouts": [P.grpo_rollouts(method, s) for s in cfg["seeds"]], "labels": P.labels, "sft": P.sft,
            "rm": P.rm, **extra}


def _report_inputs(P, cfg, method, seed):
    runs = [(mm, ss) for mm in cfg["methods"] for ss in cfg["seeds"]]
    per_run = {"heldout": [P.grpo_heldout(mm, ss) for mm, ss in runs]} if rlvr_task(cfg) else {"certify": P.certify}
    dpo = [P.evaluation(mm, ss) for mm in dpo_methods(cfg) for ss in cfg["seeds"]]  # after the GRPO runs; no curves
    return {"evals": [P.evaluation(SFT_BASELINE, cfg["seed"])] + [P.evaluation(mm, ss) for mm, ss in runs] + dpo,
            "metrics": [P.grpo_metrics(mm, ss) for mm, ss in runs], **per_run,
            **({"mechanisms": P.mechanisms} if mechanisms_on(cfg) else {})}


STAGES: dict[str, Stage] = {st.name: st for st in [
    Stage("data", "prompts with references, train/test splits (and validation with data.num_validation)",
          settings=("seed", "data", "model.name", "model.pad_token", "rlvr.system_prompt", "rlvr.one_shot"),
          inputs=_data_inputs, outputs=_data_outputs, priority=6),
    Stage("base", "build the miniature's tokenizer and tiny causal LM (miniature only)",
          settings=("seed", "model.build", "data.miniature", "data.arithmetic"),
          outputs=lambda P, cfg, *_: {"model": P.base}, priority=6),
    Stage("sft", "supervised fine-tuning on references (completion-only loss)",
          settings=("seed", "model.name", *MODEL, "sft"), inputs=_sft_inputs,
          outputs=lambda P, cfg, *_: {"model": P.sft}, data_parallel=True, priority=6),
    Stage("sample", "pairs of completions per prompt from the SFT policy",
          settings=("seed", *MODEL, "sample"), inputs=lambda P, cfg, *_: {"train": P.train, "sft": P.sft},
          outputs=lambda P, cfg, *_: {"samples": P.samples}, priority=6),
    Stage("label", "gold preference for each pair",
          settings=(*GOLD, *MODEL), inputs=lambda P, cfg, *_: {"samples": P.samples},
          outputs=lambda P, cfg, *_: {"labels": P.labels}, priority=6),
    Stage("rm", "proxy reward model (Bradley-Terry) and its held-out accuracy",
          settings=("seed", *MODEL, "rm"), inputs=lambda P, cfg, *_: {"labels": P.labels, "sft": P.sft},
          outputs=lambda P, cfg, *_: {"model": P.rm}, data_parallel=True, priority=6),
    Stage("advpo", "AdvPO's M_D^-1: the proxy RM's features on its own training pairs (methods with reward: advpo)",
          settings=("seed", *MODEL, "rm.eval_fraction", *PROXY, "advpo"),
          inputs=lambda P, cfg, *_: {"labels": P.labels, "rm": P.rm},
          outputs=lambda P, cfg, *_: {"precision": P.advpo}, priority=6),
    Stage("bspo", "BSPO's ScoreLM: the proxy RM's recipe with the LM head kept and the behavior loss (methods with "
          "reward: bspo)", settings=("seed", *MODEL, "rm", "bspo"),
          inputs=lambda P, cfg, *_: {"labels": P.labels, "sft": P.sft},
          outputs=lambda P, cfg, *_: {"model": P.bspo}, data_parallel=True, priority=6),
    Stage("rm_member", "one member k of UWO's proxy-RM ensemble: the rm stage with seed + k (ensemble section)",
          settings=("seed", *MODEL, "rm", "ensemble.model"), inputs=_member_inputs,  # not K: k does not depend on it
          outputs=lambda P, cfg, k, _: {"model": P.rm_member(k)}, per_member=True, module="rm",
          data_parallel=True, priority=6),
    Stage("grpo", "Dr.GRPO against the proxy RM for one method and seed",
          settings=(*GOLD, *MODEL, *PROXY, *RLVR, "grpo"), inputs=_grpo_inputs,
          outputs=_grpo_outputs,
          work=lambda P, cfg, method, seed: {"work": P.grpo_work(method, seed)}, per_run=True, data_parallel=True,
          many=_reward_input, priority=5),
    Stage("dpo", "DPO / TR-DPO (GR Table 1 baselines) on the labeled pairs from the SFT policy, per method and seed",
          settings=("seed", *MODEL, "dpo"), inputs=lambda P, cfg, *_: {"labels": P.labels, "sft": P.sft},
          outputs=lambda P, cfg, method, seed: {"policy": P.dpo_policy(method, seed)}, per_run=True,
          data_parallel=True, priority=5),
    Stage("evaluate", "gold win rate against references for one method and seed (or 'sft')",
          settings=(*GOLD, *MODEL, *PROXY, *RLVR, "evaluate"), inputs=_eval_inputs,
          outputs=lambda P, cfg, method, seed: {"evaluation": P.evaluation(method, seed)}, per_run=True),
    Stage("certify", "certified-radius validation of the proxy RM (SignCert Fig. 4)",
          settings=(*GOLD, *MODEL, *PROXY, "certify"),
          inputs=lambda P, cfg, *_: {"test": P.test, "sft": P.sft, "rm": P.rm},
          outputs=lambda P, cfg, *_: {"certify": P.certify}, priority=10),
    Stage("mechanisms", "each method's own signal (SignCert's rho, BSPO's support test, UWO's disagreement, AdvPO's "
          "uncertainty) on one method's rollouts, exploit vs other completions (mechanisms section)",
          settings=("seeds", "methods", "grpo", "mechanisms", "ensemble", "bspo", *GOLD, *MODEL, *PROXY),
          inputs=_mechanism_inputs, outputs=lambda P, cfg, *_: {"mechanisms": P.mechanisms},
          many=("rollouts", "ensemble", "advpo", "bspo")),
    Stage("report", "table and plots over methods x seeds", inputs=_report_inputs, many=("evals", "metrics", "heldout"),
          outputs=lambda P, cfg, *_: {"report": P.report}),
    Stage("bench", "seconds per GRPO step: noreg, gr, signcert, Elastic Reset, each reward kind and TRL's GRPOTrainer "
          "as Dr.GRPO", tool=True),
    Stage("judge-cost", "expected requests, tokens and USD of an API judge (gold.type openai) for this experiment",
          tool=True),
    Stage("download", "fetch the experiment's hub models and dataset into the hub cache, for jobs run offline",
          tool=True),
    Stage("plan", "estimated GPU memory per rank of every GPU job, and the Slurm shape, before submitting", tool=True),
]}


def _get(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


_MISSING = object()


def _put(out: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        out = out.setdefault(key, {})
    out[last] = copy.deepcopy(value)


def pick(cfg: dict, fields) -> dict:
    out: dict = {}
    for dotted in fields:
        value = _get(cfg, dotted)
        if value is not _MISSING:
            _put(out, dotted, value)
    return out


def drop(view: dict, fields) -> None:
    for dotted in fields:
        *parents, last = dotted.split(".")
        node = view
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)


def settings_view(cfg: dict, stage: str, method: str | None = None) -> dict:
    """The fields that determine `stage`'s output (for a per-run stage: its method's resolved grpo settings)."""
    view = pick(cfg, STAGES[stage].settings)
    if "grpo" in view and method is not None:  # a stage over every method (mechanisms) reads the section itself
        view["grpo"] = GRPOSettings.for_method(cfg, method).as_dict()
    if "dpo" in view:
        view["dpo"] = DPOSettings.for_method(cfg, method).as_dict()
    drop(view, SIDE_SETTINGS)
    return view


def side_view(cfg: dict) -> dict:
    """The side settings, with the experiment's default locations of the judge cache and the wandb folder filled in."""
    view = pick(cfg, SIDE_SETTINGS)
    P = Paths.from_config(cfg)
    if view.get("wandb", {}).get("dir") is None:
        view.setdefault("wandb", {})["dir"] = str(P.wandb)
    if "gold" in view and view["gold"]["judge"].get("cache") is None:
        view["gold"]["judge"]["cache"] = str(P.judge_cache)
    return view


def merge_views(settings: dict, side: dict) -> dict:
    out = copy.deepcopy(settings)
    for dotted in _leaves(side):
        _put(out, dotted, _get(side, dotted))
    return out


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "prices":  # prices: a mapping by model name, replaced whole
            out += _leaves(v, key + ".")
        else:
            out.append(key)
    return out


def stage_config(cfg: dict, stage: str, method: str | None = None) -> dict:
    """What a stage receives: its settings view with the side settings merged in."""
    return merge_views(settings_view(cfg, stage, method), side_view(cfg))


def canonical(view: dict) -> str:
    """One spelling per view: the Snakemake param compared between runs and the stage's --settings argument."""
    return json.dumps(view, sort_keys=True, separators=(",", ":"))


def stage_files(stage: str, cfg: dict, method=None, seed=None) -> dict[str, dict]:
    """{"inputs": ..., "outputs": ..., "work": ...} of one stage run, from the experiment's layout (rlhf/paths.py).
    A per-member stage's member k comes as `method` (its file functions' `m`)."""
    st, P = STAGES[stage], Paths.from_config(cfg)
    if st.per_run and method is None:
        raise ConfigError(f"stage {stage} runs per method and seed: give --method and --seed")
    if st.per_member and method is None:
        raise ConfigError(f"stage {stage} runs per ensemble member: give --member")
    return {kind: getattr(st, kind)(P, cfg, method, seed) for kind in ("inputs", "outputs", "work")}
