"""bench: seconds per GRPO step (generation / scoring / update) for noreg, gr (finite difference and exact
Hessian-vector product), signcert, Elastic Reset (the float32 EMA update), UWO (3 member RMs), AdvPO (the
references' features and the adversarial head) and BSPO (the LM head over the completions) — SignCert Table 2's
method / Dr.GRPO ratios —, and for TRL's
GRPOTrainer configured as Dr.GRPO on the same model, reward model, batch, G and lengths; then sampling with HF
generate against vLLM (where installed) at the miniature's size and a larger one.

Each timing is the mean over `--timed` steps after `--warmup` steps, from the SFT policy, in this process, repeated in
`--repeats` independent rounds (each method loaded afresh, the order rotated per round); a ratio pairs the two rows of
one round and is reported as median and min-max over the rounds, the table's rows as medians.
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

from rlhf.errors import ConfigError
from rlhf.generation import sample
from rlhf.io import atomic_dir, read_jsonl, write_json
from rlhf.models import build_tiny_causal_lm, load_causal_lm, tokenizer_of
from rlhf.paths import Paths
from rlhf.rewards.kinds import reward_kind
from rlhf.settings import GRPOSettings, ModelSettings
from rlhf.stats import spread
from rlhf.stages.common import setup
from rlhf.trainer import load_run, train_step

# name -> (the config's method it starts from when the config has it, else these overrides). Timing does not
# depend on the values; gr_hvp is the config's gr with the exact Hessian-vector-product estimator.
METHODS = {"noreg": ("noreg", {}), "gr": ("gr", {"gr_gamma": 0.1}), "gr_hvp": ("gr", {"gr_gamma": 0.1}),
           "signcert": ("signcert", {"signcert_quantile": 0.4}),
           # Dr.GRPO as SignCert's Table 2 times it: its App. F runs every method with one "KL coefficient" (0.01 for
           # Pythia 1B), so SignCert's cost is measured against Dr.GRPO with SignCert's own kl_beta; the noreg row
           # has none (and then skips the backward of micro-batches whose advantages are all zero, which a KL term
           # forbids: rlhf/trainer.py zero_gradient_chunks)
           "drgrpo_same_kl": ("signcert", {"signcert_quantile": 0.4}),
           "elastic_reset": ("elastic_reset", {"elastic_reset_every": 260, "kl_beta": 0.02}),
           "uwo": ("uwo", {"reward": "uwo", "uwo_lambda": 0.1, "uwo_penalty": "std"}),
           "advpo": ("advpo", {"reward": "advpo", "advpo_budget": 5.0}),
           "bspo": ("bspo", {"reward": "bspo", "bspo_threshold": 1e-4})}
EXTRA = {"gr_hvp": {"gr_estimator": "hvp"}, "drgrpo_same_kl": {"signcert_quantile": None}}  # SignCert's run, off
# TRL with beta = 0 computes no reference log-probs; ours also logs KL from pi_init every step by default
# (one more forward pass). The comparison with TRL uses the same work: this row turns that metric off.
SAME_WORK_AS_TRL = "noreg_without_kl_metric"


def _load(cfg, s: GRPOSettings, device):
    """The trainer on the experiment's SFT policy and proxy RM; the same prompt draws for every method (the sampler
    is seeded by cfg.seed). A reward kind's inputs are its stand-ins of the same work where it has them
    (rlhf/rewards/kinds.py: bench_inputs; UWO's members copies of the proxy RM, AdvPO's M_D^-1 the identity, BSPO's
    ScoreLM the proxy RM with the SFT policy's LM head), else its own. SignCert's UWO members are smaller than the
    proxy, so its UWO row costs less than ours here."""
    P, kind = Paths.from_config(cfg), reward_kind(s.reward)
    with tempfile.TemporaryDirectory() as tmp:
        s, inputs = kind.bench_inputs(P, s, tmp) if kind.bench_inputs else (s, kind.inputs(P, cfg))
        return load_run(cfg, s, P.train, P.sft, inputs, device)


def time_ours(cfg, s: GRPOSettings, device, warmup: int, timed: int) -> dict:
    """Mean seconds per step of each phase (wall clock, as the papers report), and `step_cpu`: this process's CPU
    seconds per step, which another process on the machine inflates far less than the wall clock (it still shares
    the caches and the memory bus)."""
    run = _load(cfg, s, device)
    rows, cpu = [], []
    for step in range(1, warmup + timed + 1):
        c0 = time.process_time()
        rows.append(train_step(run, run.prompts.batch(s.prompts_per_step), step))
        cpu.append(time.process_time() - c0)
    keys = ("time/generate", "time/score", "time/update", "time/step", "time/advantages", "length")
    out = {k.removeprefix("time/"): float(np.mean([r[k] for r in rows[warmup:]])) for k in keys}
    return {**out, "step_cpu": float(np.mean(cpu[warmup:])), "work": {"weights": str(next(run.policy.parameters()).dtype).removeprefix("torch."),
                            "autocast": None, "completions_per_step": s.prompts_per_step * s.group_size,
                            "max_new_tokens": s.max_new_tokens,
                            "reference_forward": s.kl_beta > 0 or s.kl_metric_every <= warmup + timed}}


def like_for_like(ours: dict, trl: dict) -> str | None:
    """Why two timings are not the same work (precision, batch, lengths, an extra forward pass), or None."""
    diff = [f"{k}: ours {ours['work'][k]} vs TRL {trl['work'][k]}" for k in ours["work"]
            if ours["work"][k] != trl["work"][k]]
    return "; ".join(diff) or None


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX): without it bf16 on CPU is emulated and timing it is moot."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def time_trl(cfg, s: GRPOSettings, prompts: list[str], device, warmup: int, timed: int) -> dict:
    """TRL's GRPOTrainer as Dr.GRPO: loss_type='dr_grpo', scale_rewards='none', beta=0, one update per batch,
    in the model's precision without activation checkpointing, as ours."""
    from trl import GRPOConfig, GRPOTrainer  # heavy: only the TRL comparison
    run = _load(cfg, s, device)
    run.tokenizer.padding_side = "left"
    B, G = s.prompts_per_step, s.group_size

    def proxy_reward(prompts, completions, **kwargs):
        return run.reward(prompts, [c.strip() for c in completions]).rewards.tolist()

    timer = _StepTimer()
    autocast = {"bfloat16": "bf16", "float16": "fp16"}
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, loss_type="dr_grpo", scale_rewards="none", beta=0.0, num_iterations=1,
                          num_generations=G, per_device_train_batch_size=B * G, gradient_accumulation_steps=1,
                          max_completion_length=s.max_new_tokens, temperature=s.temperature, top_k=0, top_p=1.0,
                          learning_rate=s.lr, max_grad_norm=s.max_grad_norm, epsilon=s.clip_eps,
                          max_steps=warmup + timed, logging_steps=1, save_strategy="no", report_to=[],
                          use_cpu=device.type == "cpu", seed=cfg["seed"], dataloader_num_workers=0, disable_tqdm=True,
                          # TRL defaults to bf16 autocast and activation checkpointing; ours runs the model's dtype
                          # without either (on a CPU without bf16 instructions TRL's default was 10x slower)
                          bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=run.policy, reward_funcs=proxy_reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=run.tokenizer, callbacks=[timer])
        trainer.train()
    work = {"weights": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            "autocast": next((v for k, v in autocast.items() if getattr(args, v)), None),
            "completions_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "max_new_tokens": args.max_completion_length, "reference_forward": args.beta > 0}
    return {"step": float(np.mean(timer.times[warmup:])), "work": work}


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


def time_generation(cfg, s: GRPOSettings, prompts: list[str], warmup: int, timed: int) -> dict:
    """Seconds per GRPO step's sampling, HF generate against vLLM (weight push included), at two model sizes;
    {} when vLLM is not installed."""
    try:
        from rlhf.generation_vllm import VLLMSampler  # optional: vLLM where installed
        import vllm  # noqa: F401
    except ImportError:
        print("bench: vllm is not installed: HF vs vLLM generation skipped")
        return {}
    B, G, T, temp = s.prompts_per_step, s.group_size, s.max_new_tokens, s.temperature
    batch = lambda i: prompts[i * B:(i + 1) * B]  # noqa: E731
    tokenizer, out = tokenizer_of(Paths.from_config(cfg).sft, cfg), {}
    for size, build in (("miniature", None), ("larger", LARGER)):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Paths.from_config(cfg).sft
            if build is not None:
                folder = Path(tmp)
                build_tiny_causal_lm(build, tokenizer, cfg["seed"]).save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            model = load_causal_lm(folder, ModelSettings.of(cfg).dtype)
            hf = _time(lambda i: sample(model, tokenizer, batch(i), G, T, temp, batch_size=B * G), warmup, timed)
            t0 = time.perf_counter()
            sampler = VLLMSampler(folder, tokenizer, dtype=ModelSettings.of(cfg).dtype, max_model_len=None,
                                  gpu_memory_utilization=s.vllm_gpu_memory_utilization, seed=cfg["seed"],
                                  kv_cache_gib=s.vllm_kv_cache_gib, enforce_eager=s.vllm_enforce_eager)
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


TARGETS = {"gr_update / noreg_update": "<= 2.2", "gr_hvp_update / noreg_update": "<= 2.5 (floor 2)",
           "signcert_step / drgrpo_same_kl_step": "<= 1.05 (SignCert Table 2: 0.99-1.01)",
           "signcert_step / noreg_step": "- (noreg has no KL term)", "elastic_reset_step / noreg_step": "<= 1.05",
           "uwo_step / noreg_step": "SignCert Table 2: ~1.0 (smaller members)", "advpo_step / noreg_step":
           "SignCert Table 2: 1.45-1.53", "bspo_step / noreg_step": "SignCert Table 2: 1.25-1.32",
           "signcert_step_cpu / drgrpo_same_kl_step_cpu": "(CPU seconds of this process)",
           "signcert_step / drgrpo_same_kl_step, same work": "<= 1.05 (SignCert's advantages beyond Dr.GRPO's)",
           **{f"ours_step / trl_step ({p}, same work)": "<= 1.0" for p in ("float32", "bfloat16")}}


def markdown(results: dict, ratios: dict, s: GRPOSettings, threads: int, generation: dict | None = None,
             not_comparable: dict | None = None, precisions: list[str] = ("float32",), repeats: int = 1) -> str:
    lines = [f"Seconds per GRPO step, B={s.prompts_per_step} prompts x G={s.group_size} completions, "
             f"T_max={s.max_new_tokens}, {threads} CPU thread(s); median over {repeats} independent round(s):", "",
             "| method | generate | score | update | step | step (CPU s) | advantages | tokens/completion |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in ("generate", "score", "update", "step", "step_cpu",
                                                                       "advantages"))
        lines.append(f"| {name} | {cells} | " + (f"{r['length']:.1f} |" if "length" in r else "– |"))
    lines += ["", "| ratio | median | min-max | target |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median']:.3f} | {v['min']:.3f}-{v['max']:.3f} | {TARGETS[k]} |" for k, v in ratios.items()]
    lines += [f"| {k} | not the same work: {why} | – | – |" for k, why in (not_comparable or {}).items()]
    if precisions and "bfloat16" not in precisions:  # [] : the TRL pair was not asked for (--methods)
        lines += ["", "No bf16 pair: this CPU has no bf16 instructions (AVX512-BF16 / AMX), so bf16 would be emulated."]
    if generation:
        lines += ["", "Sampling per step (same batch), HF generate vs vLLM with the weight push:", "",
                  "| model | parameters | HF | vLLM | HF / vLLM | vLLM engine start |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {g['parameters_m']:.1f}M | {g['hf']:.3f} | {g['vllm']:.3f} | {g['hf'] / g['vllm']:.2f} | "
                  f"{g['vllm_start']:.1f} |" for k, g in generation.items()]
    return "\n".join(lines) + "\n"


RATIOS = {"gr_update / noreg_update": ("gr", "noreg", "update"),
          "gr_hvp_update / noreg_update": ("gr_hvp", "noreg", "update"),
          "signcert_step / drgrpo_same_kl_step": ("signcert", "drgrpo_same_kl", "step"),
          **{f"{m}_step / noreg_step": (m, "noreg", "step") for m in ("signcert", "elastic_reset", "uwo", "advpo", "bspo")},
          "signcert_step_cpu / drgrpo_same_kl_step_cpu": ("signcert", "drgrpo_same_kl", "step_cpu")}
# SignCert's own cost on the same work: Dr.GRPO's step plus what SignCert's advantages took beyond Dr.GRPO's. The
# whole-step ratio also carries what the policies write: they drift apart within the timed steps (tokens/completion)
SAME_WORK = {"signcert_step / drgrpo_same_kl_step, same work": ("signcert", "drgrpo_same_kl")}


def run_repeats(timings: dict, repeats: int) -> tuple[dict, dict]:
    """`repeats` independent rounds of every timing in `timings` (name -> a function returning its row), each round
    in another rotation of the order, so that a drift of the machine (another process, frequency, cache) lands on
    different methods in different rounds. Returns each name's rows per round, and for each ratio of RATIOS whose
    two sides ran its value in every round (a ratio pairs the two rows of the same round)."""
    names, rounds = list(timings), {name: [] for name in timings}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(timings[name]())
            print(f"bench: round {r + 1}/{repeats}: {name}: {rounds[name][-1]}")
    ratios = {key: spread([a[col] / b[col] for a, b in zip(rounds[x], rounds[y])])
              for key, (x, y, col) in RATIOS.items() if x in rounds and y in rounds}
    ratios |= {key: spread([1 + (a["advantages"] - b["advantages"]) / b["step"] for a, b in zip(rounds[x], rounds[y])])
               for key, (x, y) in SAME_WORK.items() if x in rounds and y in rounds}
    return rounds, ratios


def median_row(rows: list[dict]) -> dict:
    """The median over rounds of each timed column; `work` as the rounds ran it (the same in every round)."""
    cols = [k for k in rows[0] if k != "work"]
    return {**{k: float(np.median([r[k] for r in rows])) for k in cols}, "work": rows[0]["work"]}


def run(cfg, args):
    device = setup(cfg, args)
    P = Paths.from_config(cfg)
    prompts = [r["prompt"] for r in read_jsonl(P.train, required=("prompt",))]
    warmup, timed, repeats = args.warmup, args.timed, args.repeats
    if repeats < 1:
        raise ConfigError(f"bench: --repeats must be at least 1, got {repeats}")
    chosen = set(args.methods or [*METHODS, "trl"])
    if unknown := sorted(chosen - {*METHODS, "trl"}):
        raise ConfigError(f"bench: --methods {' '.join(unknown)}: no such row (choose from {', '.join(METHODS)}, trl)")
    base, timings = GRPOSettings.of(cfg), {}
    for name, (method, overrides) in METHODS.items():
        if name not in chosen:
            continue
        s = GRPOSettings.for_method(cfg, method) if method in cfg["methods"] else base.replace(**overrides)
        s = s.replace(**EXTRA.get(name, {}))
        timings[name] = lambda s=s: time_ours(cfg, s, device, warmup, timed)
    # Ours against TRL: the same model, batch, lengths and precision (weights in that dtype, no autocast), and no
    # reference forward pass on either side; a pair that differs in any of these gets no ratio.
    precisions = (["float32"] + (["bfloat16"] if device.type == "cuda" or cpu_has_bf16() else [])
                  if "trl" in chosen else [])
    for dtype in precisions:
        cfg_p = {**cfg, "model": {**cfg["model"], "dtype": dtype}}
        timings[f"{SAME_WORK_AS_TRL} ({dtype})"] = lambda c=cfg_p: time_ours(c, base.replace(kl_metric_every=10**9),
                                                                             device, warmup, timed)
        timings[f"trl_grpotrainer ({dtype})"] = lambda c=cfg_p: time_trl(c, base, prompts, device, warmup, timed)
    rounds, ratios = run_repeats(timings, repeats)
    not_comparable = {}
    for dtype in precisions:
        key = f"ours_step / trl_step ({dtype}, same work)"
        ours, trl = rounds[f"{SAME_WORK_AS_TRL} ({dtype})"], rounds[f"trl_grpotrainer ({dtype})"]
        if (reason := like_for_like(ours[0], trl[0])) is None:
            ratios[key] = spread([a["step"] / b["step"] for a, b in zip(ours, trl)])
        else:
            not_comparable[key] = reason
            print(f"bench: {key}: no ratio, not the same work: {reason}")
    results = {name: median_row(rows) for name, rows in rounds.items()}
    generation = {} if args.no_vllm else time_generation(cfg, base, prompts, warmup, timed)
    text = markdown(results, ratios, base, args.threads or cfg["resources"]["threads"], generation,
                    not_comparable, precisions, repeats)
    with atomic_dir(P.root / "bench") as out:
        write_json(out / "bench.json", {"results": results, "rounds": rounds, "ratios": ratios,
                                        "not_comparable": not_comparable, "generation": generation,
                                        "warmup": warmup, "timed": timed, "repeats": repeats,
                                        "methods": sorted(chosen)})
        (out / "bench.md").write_text(text)
    print(text)
