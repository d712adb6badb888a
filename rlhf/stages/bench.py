"""bench: seconds per GRPO step (generation / scoring / update) for noreg, gr (finite difference and exact
Hessian-vector product) and signcert, and for TRL's
GRPOTrainer configured as Dr.GRPO on the same model, reward model, batch, G and lengths; then sampling with HF
generate against vLLM (where installed) at the miniature's size and a larger one.

Each timing is the mean over `--timed` steps after `--warmup` steps, from the SFT policy, in this process.
Ours runs exactly the stage's `train_step` (which also computes the KL-from-init metric every step).
Writes results/<experiment>/bench/bench.{json,md} and prints the table.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import TrainerCallback

from rlhf.config import grpo_settings
from rlhf.generation import sample
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.models import build_tiny_causal_lm, load_causal_lm
from rlhf.paths import Paths
from rlhf.stages.common import setup, sft_tokenizer
from rlhf.stages.grpo import load_run, train_step

# name -> (the config's method it starts from when the config has it, else these overrides). Timing does not
# depend on the values; gr_hvp is the config's gr with the exact Hessian-vector-product estimator.
METHODS = {"noreg": ("noreg", {}), "gr": ("gr", {"gr_gamma": 0.1}), "gr_hvp": ("gr", {"gr_gamma": 0.1}),
           "signcert": ("signcert", {"signcert_quantile": 0.4})}
EXTRA = {"gr_hvp": {"gr_estimator": "hvp"}}
# TRL with beta = 0 computes no reference log-probs; ours also logs KL from pi_init every step by default
# (one more forward pass). The comparison with TRL uses the same work: this row turns that metric off.
SAME_WORK_AS_TRL = "noreg_without_kl_metric"


def time_ours(cfg, s: dict, device, warmup: int, timed: int) -> dict:
    run = load_run(cfg, s, device)  # the same prompt draws for every method (the sampler is seeded by cfg.seed)
    rows = []
    for update in range(1, warmup + timed + 1):
        rows.append(train_step(run, run.prompts.batch(s["prompts_per_step"]), update))
    keys = ("time/generate", "time/score", "time/update", "time/step")
    return {k.removeprefix("time/"): float(np.mean([r[k] for r in rows[warmup:]])) for k in keys}


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def time_trl(cfg, s: dict, prompts: list[str], device, warmup: int, timed: int) -> dict:
    """TRL's GRPOTrainer as Dr.GRPO: loss_type='dr_grpo', scale_rewards='none', beta=0, one update per batch,
    in the model's precision without activation checkpointing, as ours."""
    from trl import GRPOConfig, GRPOTrainer
    run = load_run(cfg, s, device)
    run.tokenizer.padding_side = "left"
    B, G = s["prompts_per_step"], s["group_size"]

    def proxy_reward(prompts, completions, **kwargs):
        return run.proxy(prompts, [c.strip() for c in completions]).rewards.tolist()

    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, loss_type="dr_grpo", scale_rewards="none", beta=0.0, num_iterations=1,
                          num_generations=G, per_device_train_batch_size=B * G, gradient_accumulation_steps=1,
                          max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_k=0, top_p=1.0,
                          learning_rate=s["lr"], max_grad_norm=s["max_grad_norm"], epsilon=s["clip_eps"],
                          max_steps=warmup + timed, logging_steps=1, save_strategy="no", report_to=[],
                          use_cpu=device.type == "cpu", seed=cfg["seed"], dataloader_num_workers=0, disable_tqdm=True,
                          # TRL defaults to bf16 autocast and activation checkpointing; ours runs the model's dtype
                          # without checkpointing (on a CPU without bf16 instructions TRL's default was 10x slower)
                          bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=run.policy, reward_funcs=proxy_reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=run.tokenizer, callbacks=[timer])
        trainer.train()
    return {"step": float(np.mean(timer.times[warmup:]))}


# Where vLLM starts to pay off on CPU: the miniature's SFT policy, and a random model of a larger shape (same
# tokenizer; head_dim 64, which vLLM's CPU attention supports).
LARGER = dict(arch="qwen2", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, max_position_embeddings=128)


def _time(fn, warmup: int, timed: int) -> float:
    times = []
    for i in range(warmup + timed):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[warmup:]))


def time_generation(cfg, s: dict, prompts: list[str], warmup: int, timed: int) -> dict:
    """Seconds per GRPO step's sampling, HF generate against vLLM (weight push included), at two model sizes;
    {} when vLLM is not installed."""
    try:
        from rlhf.generation_vllm import VLLMSampler
        import vllm  # noqa: F401
    except ImportError:
        print("bench: vllm is not installed: HF vs vLLM generation skipped")
        return {}
    B, G, T, temp = s["prompts_per_step"], s["group_size"], s["max_new_tokens"], s["temperature"]
    batch = lambda i: prompts[i * B:(i + 1) * B]  # noqa: E731
    tokenizer, out = sft_tokenizer(cfg), {}
    for size, build in (("miniature", None), ("larger", LARGER)):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Paths.from_config(cfg).sft
            if build is not None:
                folder = Path(tmp)
                build_tiny_causal_lm(build, tokenizer, cfg["seed"]).save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            model = load_causal_lm(folder, cfg["model"]["dtype"])
            hf = _time(lambda i: sample(model, tokenizer, batch(i), G, T, temp, batch_size=B * G), warmup, timed)
            t0 = time.perf_counter()
            sampler = VLLMSampler(folder, tokenizer, dtype=cfg["model"]["dtype"], max_model_len=None,
                                  gpu_memory_utilization=s["vllm_gpu_memory_utilization"], seed=cfg["seed"],
                                  kv_cache_gib=s["vllm_kv_cache_gib"], enforce_eager=s["vllm_enforce_eager"])
            start = time.perf_counter() - t0

            def vllm_step(i):
                sampler.load_weights(model)
                sampler(batch(i), G, T, temp)
            fast = _time(vllm_step, warmup, timed)
            sampler.close()
        n = sum(p.numel() for p in model.parameters())
        out[size] = {"parameters_m": n / 1e6, "hf": hf, "vllm": fast, "vllm_start": start}
        print(f"bench: generation, {size} ({n / 1e6:.1f}M parameters): {out[size]}")
    return out


def markdown(results: dict, ratios: dict, s: dict, threads: int, generation: dict | None = None) -> str:
    lines = [f"Seconds per GRPO step, B={s['prompts_per_step']} prompts x G={s['group_size']} completions, "
             f"T_max={s['max_new_tokens']}, {threads} CPU thread(s):", "",
             "| method | generate | score | update | step |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cells = " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in ("generate", "score", "update", "step"))
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"gr_update / noreg_update": "<= 2.2", "gr_hvp_update / noreg_update": "<= 2.5 (floor 2)",
               "signcert_step / noreg_step": "<= 1.05",
               "ours_step / trl_step (same work)": "<= 1.0", "ours_noreg_step / trl_step (ours logs KL every step)": "–"}
    lines += [f"| {k} | {v:.3f} | {targets[k]} |" for k, v in ratios.items()]
    if generation:
        lines += ["", "Sampling per step (same batch), HF generate vs vLLM with the weight push:", "",
                  "| model | parameters | HF | vLLM | HF / vLLM | vLLM engine start |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {g['parameters_m']:.1f}M | {g['hf']:.3f} | {g['vllm']:.3f} | {g['hf'] / g['vllm']:.2f} | "
                  f"{g['vllm_start']:.1f} |" for k, g in generation.items()]
    return "\n".join(lines) + "\n"


def run(cfg, args):
    device = setup(cfg, args)
    P = Paths.from_config(cfg)
    prompts = [r["prompt"] for r in read_jsonl(P.train, required=("prompt",))]
    warmup, timed = args.warmup, args.timed
    results = {}
    for name, (method, overrides) in METHODS.items():
        s = grpo_settings(cfg, method) if method in cfg["methods"] else {**cfg["grpo"], **overrides}
        s = {**s, **EXTRA.get(name, {})}
        results[name] = time_ours(cfg, s, device, warmup, timed)
        print(f"bench: {name}: {results[name]}")
    results[SAME_WORK_AS_TRL] = time_ours(cfg, {**cfg["grpo"], "kl_metric_every": 10**9}, device, warmup, timed)
    results["trl_grpotrainer"] = time_trl(cfg, cfg["grpo"], prompts, device, warmup, timed)
    print(f"bench: trl: {results['trl_grpotrainer']}")
    ratios = {"gr_update / noreg_update": results["gr"]["update"] / results["noreg"]["update"],
              "gr_hvp_update / noreg_update": results["gr_hvp"]["update"] / results["noreg"]["update"],
              "signcert_step / noreg_step": results["signcert"]["step"] / results["noreg"]["step"],
              "ours_step / trl_step (same work)": results[SAME_WORK_AS_TRL]["step"] / results["trl_grpotrainer"]["step"],
              "ours_noreg_step / trl_step (ours logs KL every step)": results["noreg"]["step"] / results["trl_grpotrainer"]["step"]}
    generation = {} if args.no_vllm else time_generation(cfg, cfg["grpo"], prompts, warmup, timed)
    text = markdown(results, ratios, cfg["grpo"], args.threads or cfg["resources"]["threads"], generation)
    with atomic_dir(P.root / "bench") as out:
        write_json(out / "bench.json", {"results": results, "ratios": ratios, "generation": generation,
                                        "warmup": warmup, "timed": timed})
        (out / "bench.md").write_text(text)
    print(text)
