"""The overlay that lets a paper config run here: it replaces only what cannot exist on a CPU machine without the hub,
and says so field by field (`changes`, which the tests list against OVERLAID).

    snakemake --profile profiles/slurm --configfile config/paper/<x>.yaml <overlay>.yaml   # ONE flag, two files

(Snakemake 9 keeps only the last of several --configfile flags; the files of one flag are merged in order.)

What it changes and why:
- hub models (model.name, ensemble.model, gold.name) -> stand-in folders of the same architecture class and tokenizer
  behaviour (rlhf/rehearsal/standins.py);
- data.hub_name -> a local folder in that repository's real layout (rlhf/rehearsal/hub_fixtures.py);
- gold.judge.base_url -> the stand-in judge served by `vllm serve` under the config's own judge model name;
- GPUs -> CPU ranks: resources.device cpu; every rule's gpus 0, cpus 1 and a small mem_mb (the private cluster has 2
  CPUs per node); a data-parallel rule with several GPUs runs on 2 nodes x 1 rank, so ranks stay above 1 (CI's slice
  of its largest config: 1 rank, `ranks`);
- gold.judge.requests_per_minute: the OpenAI rate limit it paces for is not the stand-in server's;
- sizes that keep the batch arithmetic: the global batches (sft/rm/dpo batch_size, grpo.prompts_per_step of the grpo
  section, of each method and of each sweep's base) are scaled by new ranks / old ranks, so the per-device batch and
  the gradient accumulation (grpo.micro_batch_size) stay the paper's; the held-out and diagnostic sizes are capped
  (data.num_test where the config sets one, grpo.eval_prompts, eval_train_prompts, sharpness_perturbations,
  sharpness_prompts, certify.num_prompts and noise_samples: at most SIZES'), every one kept above zero;
- time: grpo.steps -> STEPS, and every field counted in updates (checkpoint_every, eval_every, sharpness_every,
  reset_every, elastic_reset_every, kl_beta_decay_every, TR-DPO's sync_steps) -> 1 where it is on, so a checkpoint is
  written and resets happen before the last step (evaluations run at step 0 and at the end whatever eval_every).
Everything else — learning rates, regularizer strengths, seeds, lengths, temperatures, precision — is the paper
config's own.
"""
from __future__ import annotations

import copy

from rlhf.cluster import job_spec
from rlhf.errors import ConfigError
from rlhf.rehearsal.standins import HUB_MODELS, JUDGE
from rlhf.registry import STAGES, dpo_methods
from rlhf.settings import GRPOSettings
from rlhf.config import _merge_onto

STEPS = 2                   # GRPO updates per run: a checkpoint after the first, an evaluation before the last
# Caps of the held-out and diagnostic sizes (a value already below stays)
SIZES = {"data.num_test": 16, "grpo.eval_prompts": 16, "grpo.eval_train_prompts": 16,
         "grpo.sharpness_perturbations": 4, "grpo.sharpness_prompts": 8, "certify.num_prompts": 16,
         "certify.noise_samples": 2}
NODES = 2                   # CPU ranks of a data-parallel rule that asks for several GPUs (one per node)
MEM_MB = 3000
UPDATE_COUNTS = ("checkpoint_every", "sharpness_every", "reset_every", "elastic_reset_every", "kl_beta_decay_every")
# The fields an overlay may set (dotted; <x> any key): the test checks `changes` against this list.
OVERLAID = ("model.name", "ensemble.model", "gold.name", "data.hub_name", *SIZES, "gold.judge.base_url",
            "gold.judge.requests_per_minute",
            "resources.device", "resources.jobs.<x>.gpus", "resources.jobs.<x>.cpus", "resources.jobs.<x>.mem_mb",
            "resources.jobs.<x>.nodes", "sft.batch_size", "rm.batch_size", "dpo.batch_size",
            "dpo.methods.<x>.sync_steps", "grpo.prompts_per_step", "methods.<x>.prompts_per_step",
            "sweeps.<x>.base.prompts_per_step", "grpo.steps",
            *(f"{where}.{f}" for where in ("grpo", "methods.<x>", "sweeps.<x>.base") for f in UPDATE_COUNTS))


def standin(name: str, field: str, folders: dict[str, str]) -> str:
    if name not in HUB_MODELS:
        raise ConfigError(f"{field}: no rehearsal stand-in for {name!r}: add it to HUB_MODELS in "
                          "rlhf/rehearsal/standins.py")
    return folders[HUB_MODELS[name]]


def uses_judge(cfg: dict) -> bool:
    """Whether the experiment asks an OpenAI-compatible judge (the pairwise gold, or the RLVR judge reward)."""
    return cfg["gold"]["type"] == "openai" or cfg.get("rlvr", {}).get("reward") == "judge"


def standins_needed(cfg: dict) -> set[str]:
    """The stand-in keys an experiment needs (its models, and the judge)."""
    names = [cfg["model"].get("name"), cfg.get("ensemble", {}).get("model"),
             cfg["gold"].get("name") if cfg["gold"]["type"] == "reward_model" else None]
    return {HUB_MODELS[n] for n in names if n in HUB_MODELS} | ({JUDGE} if uses_judge(cfg) else set())


def _scaled(value: int, factor: float, what: str, ranks: int = NODES) -> int:
    scaled = value * factor
    if scaled != int(scaled) or scaled < 1:
        raise ConfigError(f"{what} = {value} cannot be scaled to {ranks} rank(s) keeping its per-device batch")
    return int(scaled)


def overlay(raw: dict, cfg: dict, folders: dict[str, str], hub: dict[str, str], judge_url: str | None,
            local: bool = False, ranks: int = NODES) -> dict:
    """The overlay for one paper config. raw: the config file as written (its `extends` merged: rlhf.config's
    _read_yaml); cfg: the same validated (defaults filled, sweeps expanded); folders: stand-in key -> folder; hub:
    data.source -> fixture folder; judge_url: the served stand-in judge. local: for local Snakemake, where the CPU
    ranks of a data-parallel rule are NODES processes under torchrun on this node (gpus NODES: the launcher's rank
    count) instead of NODES nodes. ranks: the CPU ranks of such a rule (NODES; 1 runs it as one process, its batches
    scaled to one rank's: CI's slice of its largest config, rlhf/rehearsal/run.py CI_RANKS)."""
    out: dict = {"resources": {"device": "cpu", "jobs": {}}}
    model = {"name": standin(cfg["model"]["name"], "model.name", folders)}
    out["model"] = model
    if cfg.get("ensemble", {}).get("model"):
        out["ensemble"] = {"model": standin(cfg["ensemble"]["model"], "ensemble.model", folders)}
    if cfg["gold"]["type"] == "reward_model":
        out["gold"] = {"name": standin(cfg["gold"]["name"], "gold.name", folders)}
    if uses_judge(cfg):
        if judge_url is None:
            raise ConfigError(f"{cfg['experiment']}: asks a judge and no stand-in judge is served")
        out.setdefault("gold", {})["judge"] = {"base_url": judge_url, "requests_per_minute": 1e6}
    source = cfg["data"]["source"]
    if source not in hub:
        raise ConfigError(f"data.source {source}: no rehearsal dataset folder (rlhf/rehearsal/hub_fixtures.py)")
    out["data"] = {"hub_name": hub[source]}
    sharpness = any(GRPOSettings.for_method(cfg, m).sharpness_every for m in cfg["methods"])
    for dotted, cap in SIZES.items():
        section, field = dotted.split(".")
        value = cfg.get(section, {}).get(field)
        used = (section != "data" or raw.get("data", {}).get(field) is not None) and \
            (sharpness or not field.startswith("sharpness")) and (section != "certify" or "rlvr" not in cfg)
        if used and value and value > cap:
            out.setdefault(section, {})[field] = cap

    # GPUs -> CPU ranks, keeping the per-device batch and the accumulation
    rule_ranks = {}
    for rule in ["default", *(r for r in raw.get("resources", {}).get("jobs", {}) if r != "default")]:
        spec = job_spec(cfg, rule) if rule != "default" else {**cfg["resources"]["jobs"].get("default", {})}
        several = rule != "default" and STAGES[rule].data_parallel and spec.get("gpus", 0) > 1
        entry = {"cpus": 1, "mem_mb": MEM_MB}
        if spec.get("gpus", 0):
            entry["gpus"] = ranks if several and local and ranks > 1 else 0
        if several and not local and ranks > 1:
            entry["nodes"] = ranks
        out["resources"]["jobs"][rule] = entry
        if rule != "default":
            rule_ranks[rule] = (spec.get("nodes", 1) * max(spec.get("gpus", 0), 1), ranks if several else 1)

    def factor(rule: str) -> float:
        old, new = rule_ranks.get(rule, (1, 1))
        return new / old
    for section in ("sft", "rm", "dpo"):
        if section in cfg and factor(section) != 1 and not (section == "rm" and "rlvr" in cfg):
            out.setdefault(section, {})["batch_size"] = _scaled(cfg[section]["batch_size"], factor(section),
                                                                f"{section}.batch_size", ranks)
    grpo = out.setdefault("grpo", {})
    grpo["steps"] = STEPS
    f = factor("grpo")
    if f != 1:
        grpo["prompts_per_step"] = _scaled(cfg["grpo"]["prompts_per_step"], f, "grpo.prompts_per_step", ranks)
    for field in UPDATE_COUNTS:
        if cfg["grpo"][field]:
            grpo[field] = 1
    for where, entries in (("methods", raw.get("methods", {})),
                           ("sweeps", {k: v.get("base", {}) for k, v in raw.get("sweeps", {}).items()})):
        for name, fields in entries.items():
            changed = {k: 1 for k in UPDATE_COUNTS if fields.get(k)}
            if fields.get("prompts_per_step") and f != 1:
                changed["prompts_per_step"] = _scaled(fields["prompts_per_step"], f, f"{where}.{name}.prompts_per_step",
                                                      ranks)
            if changed:
                out.setdefault(where, {})[name] = changed if where == "methods" else {"base": changed}
    if dpo_methods(cfg):
        syncing = {m: {"sync_steps": 1} for m, v in cfg["dpo"]["methods"].items() if v.get("sync_alpha") is not None}
        if syncing:
            out.setdefault("dpo", {})["methods"] = syncing
    return out


def changes(overlay_: dict, prefix: str = "") -> list[str]:
    """The dotted fields an overlay sets, with rule, method, sweep and DPO-method names as <x>."""
    out = []
    for key, value in overlay_.items():
        generic = "<x>" if prefix in ("resources.jobs.", "methods.", "sweeps.", "dpo.methods.") else key
        if isinstance(value, dict):
            out += changes(value, f"{prefix}{generic}.")
        else:
            out.append(f"{prefix}{generic}")
    return sorted(set(out))


def merged(raw: dict, overlay_: dict) -> dict:
    """The paper config with the overlay merged in, as Snakemake merges two files of one --configfile."""
    return _merge_onto(copy.deepcopy(raw), copy.deepcopy(overlay_))
