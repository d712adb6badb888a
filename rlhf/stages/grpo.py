"""grpo: Dr.GRPO for one method and seed (the trainer: rlhf/trainer.py), against the proxy RM or, in an RLVR
experiment, the verifiable reward.

Files: inputs train, test, sft and the method's reward kind's (rlhf/rewards/kinds.py: rm for the proxy RM, ensemble
for UWO's members, rm and advpo for AdvPO's M_D^-1, bspo for BSPO's ScoreLM, none for an RLVR reward); outputs
policy (folder), metrics (one JSON line per step and per held-out evaluation)
and, RLVR only, heldout (per evaluation step, whether each held-out question was solved); work: the folder of the run
in progress (its checkpoint and the live metrics log, `tail -f` it), kept
across attempts so a killed run resumes, removed once the outputs are in place.
"""
from __future__ import annotations

import contextlib
import shutil
import sys

import torch
from tqdm import trange

from rlhf.diagnostics import onpolicy_rm_accuracy, sharpness
from rlhf.distributed import Dist
from rlhf.data.rlvr import rlvr_task
from rlhf.evaluation import evaluate_policy, evaluate_rlvr
from rlhf.io import atomic_dir, atomic_file, read_jsonl
from rlhf.metrics_log import MetricsLog
from rlhf.registry import GRPO_INPUTS
from rlhf.rewards.gold import make_gold
from rlhf.settings import GRPOSettings, ModelSettings
from rlhf.stages.common import setup
from rlhf.trainer import (fingerprint, load_checkpoint, load_run, perturbation_lost, rounding_warning,
                          save_checkpoint, train_step)


def run(cfg, files, args):
    method, seed = args.method, args.seed
    if cfg.get("gold", {}).get("judge", {}).get("batch_api"):
        # Rank 0 asks the judge while every other rank waits at a barrier: a batch taking hours would outlive the
        # process group's timeout. The label and evaluate stages keep the Batch API.
        print("grpo: gold.judge.batch_api applies to label and evaluate; this stage asks the judge online")
        cfg = {**cfg, "gold": {**cfg["gold"], "judge": {**cfg["gold"]["judge"], "batch_api": False}}}
    settings = GRPOSettings.of(cfg)  # the view holds the method's resolved settings (rlhf/registry.py)
    inputs, outputs, work = files.inputs, files.outputs, files.work["work"]
    dist = Dist.from_env(setup(cfg, args, seed=seed))
    if dist.rank:
        torch.manual_seed(seed + 1_000_003 * dist.rank)  # each rank samples its own completions
    main = dist.is_main
    ckpt_dir, live_metrics = work / "checkpoint", work / "metrics.jsonl"
    heldout = read_jsonl(inputs["test"], required=("prompt", "reference"))[: settings.eval_prompts]
    train_judged = read_jsonl(inputs["train"], required=("prompt", "reference"))[: settings.eval_train_prompts]
    # data.num_validation: prompts judged at each evaluation too, disjoint from the reported test set (tuning, early
    # stopping: config/claims.yaml's protocol)
    validation = read_jsonl(inputs["validation"], required=("prompt", "reference")) if "validation" in inputs else []
    task = rlvr_task(cfg)

    reward_inputs = {k: v for k, v in inputs.items() if k not in GRPO_INPUTS}  # the reward kind's
    with contextlib.ExitStack() as stack:
        grpo_run = stack.enter_context(load_run(cfg, settings, inputs["train"], inputs["sft"], reward_inputs,
                                                dist.device, dist, seed=seed))  # closed however the stage ends
        policy, initial, reward, tokenizer = grpo_run.policy, grpo_run.initial, grpo_run.reward, grpo_run.tokenizer
        if hasattr(reward, "on_one_rank"):  # rank 0 evaluates alone (AdvPO: against the held-out prompts' references)
            reward = reward.on_one_rank({r["prompt"]: r["reference"] for r in heldout})
        gold = make_gold(cfg, dist.device) if main and not task else None  # only rank 0 evaluates
        heldout_reward = validation_reward = None
        if main and task:  # the training reward on the held-out questions (the same judge client and cache)
            heldout_reward = reward.for_rows(heldout)
            validation_reward = reward.for_rows(validation) if validation else None

        stamp = fingerprint(cfg, settings, seed, inputs["train"],
                            [inputs["sft"], *(p for paths in reward_inputs.values() for p in paths)])
        start = load_checkpoint(ckpt_dir, grpo_run, stamp)
        log = stack.enter_context(MetricsLog(
            live_metrics, resume_step=start, cfg=cfg, run_name=f"grpo-{method}-seed{seed}", job_type="grpo",
            run_config={"method": method, "seed": seed, "world_size": dist.world_size, **settings.as_dict()})
        ) if main else None
        # RLVR: which held-out questions each evaluation solved (a list in heldout order per step; the difficulty table)
        solved = stack.enter_context(MetricsLog(work / "heldout.jsonl", resume_step=start)) if main and task else None
        # grpo.rollouts_every: what the policy wrote, one line per completion with its step (the mechanism diagnostics)
        rollouts = stack.enter_context(MetricsLog(work / "rollouts.jsonl", resume_step=start)) \
            if main and "rollouts" in outputs else None
        eval_kwargs = dict(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens)
        heldout_prompts = [r["prompt"] for r in heldout]

        def diagnose(step: int) -> None:
            """Gold evaluation and diagnostics on rank 0 (the others wait); own RNG streams, so they never change
            the training trajectory."""
            if main and task:
                with torch.random.fork_rng():
                    torch.manual_seed(seed * 1_000_003 + step)
                    metrics, rows = evaluate_rlvr(policy, tokenizer, heldout, task, heldout_reward, reward.verifier,
                                                  **eval_kwargs)
                out = {f"eval/{k}": v for k, v in metrics.items()}
                if validation:
                    with torch.random.fork_rng():
                        torch.manual_seed(seed * 1_000_003 + step + 700_001)
                        val, _ = evaluate_rlvr(policy, tokenizer, validation, task, validation_reward,
                                               reward.verifier, **eval_kwargs)
                    out.update({"eval/validation_accuracy": val["accuracy"], "eval/validation_n": val["n"]})
                log.write(step, out)
                solved.write(step, {"correct": [r["correct"] for r in rows]})
            elif main:
                with torch.random.fork_rng():
                    torch.manual_seed(seed * 1_000_003 + step)
                    metrics, _ = evaluate_policy(policy, tokenizer, heldout, gold, reward, initial, **eval_kwargs)
                out = {f"eval/{k}": v for k, v in metrics.items()}
                if train_judged:  # GR Sec. 5.1's "training winrate", the early-stopping signal (rlhf/tables.py)
                    with torch.random.fork_rng():
                        torch.manual_seed(seed * 1_000_003 + step + 500_009)
                        train_metrics, _ = evaluate_policy(policy, tokenizer, train_judged, gold, **eval_kwargs)
                    out.update({"eval/train_win_rate": train_metrics["win_rate"], "eval/train_n": train_metrics["n"]})
                if validation:
                    with torch.random.fork_rng():
                        torch.manual_seed(seed * 1_000_003 + step + 700_001)
                        val, _ = evaluate_policy(policy, tokenizer, validation, gold, **eval_kwargs)
                    out.update({"eval/validation_win_rate": val["win_rate"], "eval/validation_n": val["n"]})
                out.update(onpolicy_rm_accuracy(policy, tokenizer, heldout_prompts, gold, reward, seed=seed + step,
                                                **eval_kwargs))
                if settings.sharpness_every and step % settings.sharpness_every == 0:
                    out.update(sharpness(policy, tokenizer, heldout_prompts[: settings.sharpness_prompts], reward,
                                         perturbations=settings.sharpness_perturbations,
                                         radius=settings.sharpness_radius, seed=seed + step, **eval_kwargs))
                log.write(step, out)
            dist.barrier()

        warned_rounding = False
        if start == 0:
            diagnose(0)
        for step in trange(start + 1, settings.steps + 1, desc=f"grpo {method} seed{seed}", initial=start,
                           total=settings.steps, disable=not main):  # step: 1-based index of the optimizer update
            batch = dist.broadcast(grpo_run.prompts.batch(settings.prompts_per_step))  # rank 0's draw, on every rank
            stats = train_step(grpo_run, batch, step)
            rows = stats.pop("rollout", None)
            if main:
                log.write(step, stats)
                if rollouts is not None:
                    for row in rows or []:
                        rollouts.write(step, row)
                if not warned_rounding and perturbation_lost(stats):
                    print(rounding_warning(stats, ModelSettings.of(cfg).dtype), file=sys.stderr)
                    warned_rounding = True
            if step % settings.eval_every == 0 or step == settings.steps:
                diagnose(step)
            if step % settings.checkpoint_every == 0 and step < settings.steps:
                save_checkpoint(ckpt_dir, grpo_run, step, stamp)
        if main:
            log.close()
            with atomic_dir(outputs["policy"]) as out:
                policy.save_pretrained(out)
                tokenizer.save_pretrained(out)
            with atomic_file(outputs["metrics"]) as f:
                f.write(live_metrics.read_text())
            for name, kept in (("heldout", solved), ("rollouts", rollouts)):
                if kept is not None:
                    kept.close()
                    with atomic_file(outputs[name]) as f:
                        f.write((work / f"{name}.jsonl").read_text())
            shutil.rmtree(work, ignore_errors=True)
            print(f"grpo: {method} seed {seed}: {settings.steps} steps on {dist.world_size} rank(s) -> "
                  f"{outputs['policy']}")
        dist.barrier()  # the last collective: leaving the block closes the run, and vLLM's shutdown tears down the
        #                 default process group
    dist.close()
