"""mechanisms: does each method's own signal notice the exploit, on the completions a policy actually wrote?

For every seed of `mechanisms.method` (noreg in the claims' protocol, config/claims.yaml), the completions its policy
wrote every grpo.rollouts_every updates (the run's rollouts.jsonl: each logged step's global batch, G completions per
prompt in a row) are scored by the proxy RM (reward and head features) and the gold. A completion is an exploit when
the proxy rates it above mechanisms.proxy_quantile of the SFT policy's completions (the labelled pairs: pi_0's own
samples, scored by the gold when they were labelled) and the gold below mechanisms.gold_quantile of theirs
(rlhf/mechanisms.py: exploit_mask). Then each signal of the experiment's methods, with that method's own settings
(the first method that uses it):

  signcert  a method with signcert_quantile: its rule on each logged step's batch (epsilon from that batch, as in
            training, advantages from the proxy rewards): rho < 0 and the certified radius
  bspo      a method with reward bspo: its support test (least-supported log beta <= log bspo_threshold)
  uwo       a method with reward uwo: the members' reward std
  advpo     a method with reward advpo: sqrt(e^T M_D^-1 e) of the proxy's features

Each signal is split exploit vs other over all logged steps of a seed, and per logged step (the curve over training);
where the task has its own exploit marker (the out-of-distribution miniature's marks), the share of each side that
carries it is reported beside (task_marker/*).
Outputs mechanisms/summary.json: {"seeds": {seed: {signal metrics ..., "steps": {step: {...}}}}, "signals": which
method's settings each signal took, "exploit_thresholds"}. Needs a gold that scores (reward model or programmatic).
"""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.bspo import behavior_supported_rewards
from rlhf.algorithms.signcert import signcert
from rlhf.data.miniature import MiniatureSpec, is_exploit
from rlhf.errors import DataError
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.mechanisms import advpo_by_exploit, bspo_by_exploit, exploit_mask, signcert_split, uwo_by_exploit
from rlhf.models import tokenizer_of
from rlhf.rewards.gold import make_gold
from rlhf.rewards.proxy_rm import load_bspo, load_proxy
from rlhf.settings import GRPOSettings, MechanismSettings
from rlhf.stages.common import setup


def task_marker(cfg: dict):
    """The task's own exploit test (text -> bool) where it has one: the out-of-distribution miniature's marks beyond
    what the gold likes (rlhf/data/miniature.py is_exploit); None elsewhere."""
    if cfg["data"]["source"] != "miniature" or not cfg["data"]["miniature"].get("emphasis_max"):
        return None
    spec = MiniatureSpec.from_config(cfg)
    return lambda text: is_exploit(text, spec)


def signal_methods(cfg: dict) -> dict[str, str]:
    """signal -> the first of the experiment's methods that uses it (its settings are the signal's)."""
    found: dict[str, str] = {}
    for name in cfg["methods"]:
        s = GRPOSettings.for_method(cfg, name)
        if s.signcert_quantile is not None:
            found.setdefault("signcert", name)
        if s.reward in ("bspo", "uwo", "advpo"):
            found.setdefault(s.reward, name)
    return found


def _by_step(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in rows:
        out.setdefault(int(row["step"]), []).append(row)
    return out


def signals(t: dict) -> dict:
    """Each signal present in t, exploit vs other: t = {"exploit": [N] bool, "advantages" [N], and per signal its
    input: "rho" and "radius" (SignCert's rule, already applied), "unsupported" (BSPO), "members" [k, N]
    (UWO), "features" with "m_inverse" (AdvPO); and "task_exploit" [N] bool, a task's own exploit marker}."""
    exploit = t["exploit"]
    out = {"n": int(exploit.numel()), "n_exploit": int(exploit.sum())}
    if "rho" in t:
        out.update(signcert_split(t["advantages"], t["rho"], t["radius"], exploit))
    if "unsupported" in t:
        out.update(bspo_by_exploit(t["unsupported"], exploit))
    if "members" in t:
        out.update(uwo_by_exploit(t["members"], exploit))
    if "m_inverse" in t:
        out.update(advpo_by_exploit(t["features"], t["m_inverse"], exploit))
    if "task_exploit" in t:  # the task's own marker beside the claims' definition (config/claims.yaml)
        marked = t["task_exploit"]
        out["task_marker/share"] = marked.double().mean().item()
        out["task_marker/of_exploits"] = marked[exploit].double().mean().item() if exploit.any() else float("nan")
        out["task_marker/of_others"] = marked[~exploit].double().mean().item() if (~exploit).any() else float("nan")
    out["n_exploit"], out["n_other"] = int(exploit.sum()), int((~exploit).sum())  # all completions, not the signed
    return out


def diagnose(steps: dict[int, dict], group_size: int, rule: dict | None) -> dict:
    """One seed's signals from its logged steps (steps[step]: `signals`' t without SignCert's rule, which is applied
    here per step: epsilon from that step's batch, as in training; rule: signcert's quantile and options, None without
    a SignCert method): pooled over the steps, and per step."""
    per_step, pooled = {}, {}
    for step, t in sorted(steps.items()):
        if rule is not None:
            cert = signcert(t["advantages"], t["features"], group_size, **rule)
            t = {**t, "rho": cert.rho, "radius": cert.radius}
        per_step[step] = signals(t)
        for k, v in t.items():
            pooled.setdefault(k, []).append(v)
    if not pooled:
        return {"n": 0, "n_exploit": 0, "steps": {}}
    merged = {k: v[0] if k == "m_inverse" else torch.cat(v, dim=1 if k == "members" else 0) for k, v in pooled.items()}
    return {**signals(merged), "steps": per_step}


def run(cfg, files, args):
    device = setup(cfg, args)
    m, inputs = MechanismSettings.of(cfg), files.inputs
    G = GRPOSettings.for_method(cfg, m.method).group_size
    used = signal_methods(cfg)
    tokenizer = tokenizer_of(inputs["sft"], cfg)
    proxy = load_proxy(inputs["rm"], cfg, tokenizer, device)
    labels = read_jsonl(inputs["labels"], required=("prompt", "chosen", "rejected"))
    if "gold_chosen" not in labels[0]:
        raise DataError(f"mechanisms: {inputs['labels']} has no gold scores (gold.type {cfg['gold']['type']} only "
                        "prefers): the exploit definition needs a gold that scores (reward_model or programmatic)")
    prompts0 = [r["prompt"] for r in labels for _ in (0, 1)]
    texts0 = [r[k] for r in labels for k in ("chosen", "rejected")]
    initial_proxy = proxy(prompts0, texts0).rewards
    initial_gold = torch.tensor([r[k] for r in labels for k in ("gold_chosen", "gold_rejected")], dtype=torch.float64)

    gold = make_gold(cfg, device)
    members = [load_proxy(folder, cfg, tokenizer_of(folder, cfg), device) for folder in inputs.get("ensemble", [])] \
        if "uwo" in used else []
    bspo = load_bspo(inputs["bspo"][0], cfg, GRPOSettings.for_method(cfg, used["bspo"]), tokenizer, device) \
        if "bspo" in used else None
    m_inverse = torch.load(inputs["advpo"][0], weights_only=True)["m_inverse"] if "advpo" in used else None
    rule = None
    if "signcert" in used:  # the worst case's sign is the signal: unclipped whatever the method applies
        s = GRPOSettings.for_method(cfg, used["signcert"])
        rule = {"quantile": s.signcert_quantile, "epsilon_from": s.signcert_epsilon_from,
                "quantile_over": s.signcert_quantile_over}
    marker = task_marker(cfg)

    seeds = {}
    for seed, path in zip(cfg["seeds"], inputs["rollouts"]):
        rows = read_jsonl(path, required=("step", "prompt", "completion"))
        if not rows:
            raise DataError(f"mechanisms: {path} is empty: method {m.method} kept no rollouts")
        steps = {}
        for step, batch in _by_step(rows).items():
            if len(batch) % G:
                raise DataError(f"mechanisms: {path}: step {step} has {len(batch)} completions, not groups of {G}")
            prompts, texts = [r["prompt"] for r in batch], [r["completion"] for r in batch]
            scores = proxy(prompts, texts)
            t = {"exploit": exploit_mask(scores.rewards, torch.as_tensor(gold.score(prompts, texts)), initial_proxy,
                                         initial_gold, m.proxy_quantile, m.gold_quantile),
                 "advantages": dr_grpo_advantages(scores.rewards, G), "features": scores.features}
            if bspo is not None:
                behavior, least = bspo.behavior(prompts, texts)
                t["unsupported"] = behavior_supported_rewards(behavior.rewards, least, bspo.threshold, bspo.r_min)[1]
            if members:
                t["members"] = torch.stack([member(prompts, texts).rewards for member in members])
            if m_inverse is not None:
                t["m_inverse"] = m_inverse
            if marker is not None:
                t["task_exploit"] = torch.tensor([marker(text) for text in texts])
            steps[step] = t
        seeds[str(seed)] = diagnose(steps, G, rule)
        print(f"mechanisms: seed {seed}: {seeds[str(seed)]['n_exploit']} of {seeds[str(seed)]['n']} completions "
              f"are exploits ({len(steps)} logged steps of {m.method})")
    summary = {"method": m.method, "signals": used, "seeds": seeds, "proxy_quantile": m.proxy_quantile,
               "gold_quantile": m.gold_quantile,
               "exploit_thresholds": {"proxy": torch.quantile(initial_proxy.double(), m.proxy_quantile).item(),
                                      "gold": torch.quantile(initial_gold, m.gold_quantile).item()}}
    with atomic_dir(Path(files.outputs["mechanisms"])) as out:
        write_json(out / "summary.json", summary)
