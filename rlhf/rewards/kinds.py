"""Which reward GRPO trains on: one table, one entry per kind. A method names its kind in `grpo.reward` (per method
overridable, like every grpo field); everything that depends on the reward reads the kind's entry here:

  rlhf/config.py       the config check: its task (RLHF or RLVR), the config section and settings it needs, the
                       settings of other kinds a method may not set, whether SignCert-PO can certify it
  rlhf/registry.py     the grpo rule's inputs (the kind's own), and which stages the DAG needs (its `stages`)
  rlhf/trainer.py      the loader (`load_reward`), and through the run's inputs the checkpoint's fingerprint
  rlhf/stages/bench.py stand-in inputs of the same work (`bench_inputs`), so `make bench` times every kind
  Snakefile            a rule for each stage the experiment's kinds need (through the registry)

Adding a reward is a new entry and its loader (docs/extending.md: a worked example, carried out by
tests/test_extending.py). This module imports nothing heavy: the config check and the Snakefile read the table
without loading torch, so a loader is named as "module:function" and imported when a run loads it.

A loader takes a `RewardContext` and returns a reward: a callable (prompts, completions) -> scores with `.rewards`
([N] float32) and `.features` ([N, d] for a reward model's linear head, SignCert-PO's input; else empty), optionally
also `close()` (what it started: a judge server) and `on_one_rank(references)` (the same reward for rank 0's held-out
evaluation while the other ranks wait: no collective inside).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf.errors import ConfigError
from rlhf.paths import Paths

Inputs = Callable[[Paths, dict], dict[str, list[Path]]]  # (the experiment's paths, its config) -> {name: [paths]}


@dataclass(frozen=True)
class RewardContext:
    """What a loader gets: the experiment's config and the method's GRPO settings, the policy's tokenizer, the device,
    the data-parallel group (`dist.gather` for a reward computed over the global batch), the training rows (prompts
    with references or solutions) and the kind's declared inputs (each a list of paths)."""
    cfg: dict
    settings: Any                      # rlhf.settings.GRPOSettings
    tokenizer: Any
    device: Any
    dist: Any                          # rlhf.distributed.Dist
    rows: list[dict]
    inputs: dict[str, list[Path]] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardKind:
    name: str
    help: str
    loader: str | Callable             # "module:function" (imported on use) or the function: (RewardContext) -> reward
    task: str = "rlhf"                 # rlhf: an experiment with preference pairs; rlvr: one with an rlvr section
    inputs: Inputs = lambda P, cfg: {}  # the files a run reads beside train, test and the SFT policy
    stages: tuple[str, ...] = ()       # the stages (rlhf/registry.py) that build those files
    section: str | None = None         # a config section it needs
    fields: tuple[str, ...] = ()       # GRPO settings only this kind reads (null by default, set only with it)
    required: tuple[str, ...] = ()     # of those, the ones it cannot do without
    certifiable: bool = False          # SignCert-PO applies: the reward is one linear head over features
    bench_inputs: Callable | None = None  # (Paths, settings, tmp folder) -> (settings, inputs): the same work

    def load(self, ctx: RewardContext):
        loader = self.loader
        if isinstance(loader, str):
            module, _, name = loader.partition(":")
            loader = getattr(importlib.import_module(module), name)
        return loader(ctx)


REWARDS: dict[str, RewardKind] = {}
RLVR_DEFAULT = "verifiable"  # grpo.reward's default in an RLVR experiment (rlhf/config.py); the schema's is proxy


def register(kind: RewardKind) -> RewardKind:
    """Add a kind to the table (a name may be registered once)."""
    if kind.name in REWARDS and REWARDS[kind.name] != kind:
        raise ValueError(f"reward kind {kind.name!r} is registered already")
    REWARDS[kind.name] = kind
    return kind


def reward_kind(name: str) -> RewardKind:
    if name not in REWARDS:
        raise ConfigError(f"grpo.reward: unknown reward {name!r} (have: {', '.join(REWARDS)}; rlhf/rewards/kinds.py)")
    return REWARDS[name]


def _ensemble(P: Paths, cfg: dict) -> dict[str, list[Path]]:
    members = cfg.get("ensemble", {}).get("members", 0)
    return {"ensemble": [P.rm_member(k) for k in range(1, members + 1)]}


def _bench_uwo(P, settings, tmp):
    """UWO's members: copies of the proxy RM (SignCert's 3 members; the work is K member forward passes)."""
    return settings, {"ensemble": [P.rm] * 3}


def _bench_advpo(P, settings, tmp):
    """AdvPO's M_D^-1: the identity (the work is the references' forward and the d x d product, not its values)."""

    import torch  # the bench stage has it loaded; the table stays light for the config check
    d = json.loads((P.rm / "config.json").read_text())["hidden_size"]
    torch.save({"m_inverse": torch.eye(d)}, Path(tmp) / "precision.pt")
    return settings, {"rm": [P.rm], "advpo": [Path(tmp) / "precision.pt"]}


def _bench_bspo(P, settings, tmp):
    """BSPO's ScoreLM: the proxy RM with the SFT policy's LM head (one backbone pass, both heads); its folder records
    no r_min_train (the value costs nothing)."""
    return settings.replace(bspo_r_min=settings.bspo_r_min if settings.bspo_r_min is not None else -10.0), \
        {"bspo": [P.rm]}


for _kind in (
    RewardKind("proxy", "the proxy RM (Bradley-Terry on the gold's labels): reward and features from its linear head",
               "rlhf.rewards.proxy_rm:load_proxy_reward", inputs=lambda P, cfg: {"rm": [P.rm]}, certifiable=True),
    RewardKind("uwo", "UWO (Coste et al. 2024): the ensemble's mean minus uwo_lambda times its disagreement",
               "rlhf.rewards.proxy_rm:load_uwo_reward", inputs=_ensemble, stages=("rm_member",), section="ensemble",
               fields=("uwo_lambda",), required=("uwo_lambda",), bench_inputs=_bench_uwo),
    RewardKind("advpo", "AdvPO (Zhang et al. 2024): the proxy's features times the most pessimistic head within "
               "advpo_budget", "rlhf.rewards.proxy_rm:load_advpo_reward",
               inputs=lambda P, cfg: {"rm": [P.rm], "advpo": [P.advpo]}, stages=("advpo",),
               fields=("advpo_budget",), required=("advpo_budget",), bench_inputs=_bench_advpo),
    RewardKind("bspo", "BSPO (Dai et al. 2025): the ScoreLM's reward, bspo_r_min for a completion outside the "
               "behavior support", "rlhf.rewards.proxy_rm:load_bspo_reward", inputs=lambda P, cfg: {"bspo": [P.bspo]},
               stages=("bspo",), fields=("bspo_threshold", "bspo_r_min"), required=("bspo_threshold",),
               bench_inputs=_bench_bspo),
    RewardKind(RLVR_DEFAULT, "RLVR: the rule terms or the LLM judge's (rlvr.reward) against the data's solutions",
               "rlhf.rewards.verifiable:load_verifiable_reward", task="rlvr", section="rlvr"),
):
    register(_kind)


def kinds_of(cfg: dict) -> list[RewardKind]:
    """The kinds the experiment's GRPO methods train on (each once, in method order)."""
    names = [{**cfg["grpo"], **overrides}["reward"] for overrides in cfg["methods"].values()]
    return [reward_kind(name) for name in dict.fromkeys(names)]


def check(cfg: dict, source: str, method: str, settings) -> None:
    """A method's reward against the experiment: its task, the section it needs, its required settings, no setting of
    another kind, and SignCert-PO only on a certifiable reward. Raises ConfigError naming the field."""
    kind = REWARDS.get(settings.reward)
    where = f"{source}: methods.{method}"
    if kind is None:
        raise ConfigError(f"{where}: reward {settings.reward!r} is not a reward kind (have: {', '.join(REWARDS)})")
    rlvr = "rlvr" in cfg
    if (kind.task == "rlvr") != rlvr:
        have = ", ".join(k.name for k in REWARDS.values() if (k.task == "rlvr") == rlvr)
        raise ConfigError(f"{where}: reward {kind.name} is an {kind.task.upper()} reward; this experiment is "
                          f"{'RLVR' if rlvr else 'RLHF'} (rewards for it: {have})")
    if kind.section and kind.section not in cfg:
        raise ConfigError(f"{where}: reward {kind.name} needs an {kind.section} section"
                          + (" (ensemble: {} for 3 members from the SFT policy)" if kind.section == "ensemble" else ""))
    for name in kind.required:
        if getattr(settings, name) is None:
            raise ConfigError(f"{where}: reward {kind.name} needs {name}")
    for other in REWARDS.values():
        for name in other.fields:
            if other is not kind and name not in kind.fields and getattr(settings, name, None) is not None:
                raise ConfigError(f"{where}: {name} is reward {other.name}'s setting; the method's reward is "
                                  f"{kind.name} (set reward: {other.name} to train on it)")
    if settings.signcert_quantile is not None and not kind.certifiable:
        raise ConfigError(f"{where}: SignCert-PO certifies one reward model's linear head; reward {kind.name} has "
                          "none (signcert_quantile needs reward: proxy)")
