"""gpu-smoke: the paper-scale path in minutes on one CUDA GPU, run the way a cluster job runs it.

A random Qwen2.5-0.5B-shaped model (built from a config: 24 layers, d 896, 14 heads / 2 KV heads, MLP 4864,
vocabulary padded to 151,936, tied embeddings; no hub) in bf16, on the miniature task, through every stage as its
own process (`python -m rlhf <stage>`): data, base, sft, sample, label, rm, grpo for each method under DeepSpeed
ZeRO-2 and under the torch backend (sharpness and on-policy diagnostics on, at step 0 as in the GR configs),
evaluate and certify. It prints seconds per GRPO step (generate / score / update, steps after the first) and peak
GPU memory per method, then runs the device checks (device_checks: GR's correction survives a bf16 update on both
backends, a hub-shaped model loads and samples, NCCL between 2 processes where there are 2 GPUs, GRPO sampling with
vLLM where it is installed), writes <results>/gpu-smoke/smoke.{md,json}, and exits non-zero if anything failed.

    python -m rlhf.smoke                          # make gpu-smoke: CUDA, the 0.5B shape
    python -m rlhf.smoke --device cpu --shape tiny --methods gr,gr-hvp   # the same path on a CPU (the tests)
"""
# Function-level imports: the orchestrator runs every stage as its own process (as a cluster job would) and must not
# hold torch or a CUDA context itself; the in-process device checks import what they use.
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

SHAPES = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, max_position_embeddings=1024),
    "tiny": dict(arch="qwen2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=128),
}
METHODS = {"noreg": {}, "kl": {"kl_beta": 0.05}, "resets": {"kl_beta": 0.2, "reset_every": 2},
           "gr": {"gr_gamma": 0.01}, "gr-hvp": {"gr_gamma": 0.01, "gr_estimator": "hvp"},
           "signcert": {"signcert_quantile": 0.25, "kl_beta": 0.01}}
BACKENDS = ("deepspeed", "torch")
STEP_TIMES = ("time/generate", "time/score", "time/update", "time/step")


def smoke_config(results: Path, device: str, shape: str, methods: list[str], steps: int) -> dict:
    return {
        "experiment": "gpu-smoke", "results_dir": str(results), "seed": 0, "seeds": [0],
        "methods": {f"{m}-{b}": {**METHODS[m], "backend": b} for m in methods for b in BACKENDS},
        "data": {"source": "miniature", "num_train": 256, "num_test": 16},
        "model": {"build": SHAPES[shape], "dtype": "bfloat16"},
        "sft": {"lr": 1.0e-4, "epochs": 1, "batch_size": 16, "max_length": 128},
        "sample": {"num_prompts": 48, "temperature": 1.0, "max_new_tokens": 32, "batch_size": 48},
        "gold": {"type": "programmatic", "label_temperature": 0.1},
        "rm": {"lr": 1.0e-5, "epochs": 1, "batch_size": 8, "max_length": 128},
        "grpo": {"steps": steps, "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 32, "temperature": 1.0,
                 "lr": 5.0e-6, "micro_batch_size": 16, "eval_every": steps, "eval_prompts": 8,
                 "checkpoint_every": steps, "sharpness_every": steps, "sharpness_perturbations": 2,
                 "sharpness_prompts": 4},
        "evaluate": {"temperature": 1.0, "max_new_tokens": 32},
        "certify": {"num_prompts": 8, "group_size": 4, "max_new_tokens": 32, "noise_samples": 2, "bins": 4},
        # On the CPU (the suite's run of this command, beside another test worker) one torch thread: two beside a
        # busy process run 3-4x slower than one.
        "resources": {"device": device, "threads": 1 if device == "cpu" else 2},
    }


def run_stage(config: Path, logs: Path, stage: str, *args: str) -> tuple[bool, float]:
    """One stage in its own process, as a cluster job runs it; (succeeded, seconds). Output goes to a log."""
    name = "_".join([stage, *args[1::2]]) if args else stage
    start = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "rlhf", stage, "--config", str(config), *args],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = (logs / f"{name}.log").read_text().splitlines()[-15:]
        print(f"gpu-smoke: {name} FAILED (exit {done.returncode}) after {seconds:.0f} s:\n  " + "\n  ".join(tail))
    else:
        print(f"gpu-smoke: {name} ok ({seconds:.0f} s)")
    return done.returncode == 0, seconds


def grpo_row(metrics: Path) -> dict:
    """Mean seconds per step after the first (warm-up) and the peak GPU memory of one GRPO run."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "time/step" in r]
    timed = train[1:] or train
    out = {k.removeprefix("time/"): sum(r[k] for r in timed) / len(timed) for k in STEP_TIMES}
    peaks = [r["memory/peak_gib"] for r in train if r.get("memory/peak_gib") is not None]
    out["peak_gib"] = max(peaks) if peaks else None
    out["sharpness"] = any("sharpness" in r for r in rows)
    out["onpolicy"] = any("onpolicy/rm_accuracy" in r for r in rows)
    return out


# --- the checks of what only a GPU can show (each also runs on the CPU, where tests/test_smoke.py runs them) ---------

def gr_correction_share(device: str, backend: str, estimator: str, gamma: float = 1e-3) -> float:
    """The share of GR's correction gamma * (curvature term) that reaches the gradient the optimizer steps on, with bf16
    weights at the configs' gamma: runs with gamma and 2 gamma on the same rollouts write g1 + gamma * D and
    g1 + 2 gamma * D in fp32, so what the optimizer gets should differ by gamma * D; the share is
    1 - ||difference got - gamma * D|| / ||gamma * D|| (1: whole; 0: rounding took it all)."""
    import copy

    import torch

    from rlhf.data.miniature import MiniatureSpec
    from rlhf.distributed import Dist, make_update
    from rlhf.generation import sample
    from rlhf.models import build_tiny_causal_lm, build_word_tokenizer
    from rlhf.rewards.proxy_rm import Scores
    from rlhf.settings import GRPOSettings
    from rlhf.trainer import grpo_step
    from rlhf.config import load_config
    tok = build_word_tokenizer(MiniatureSpec().vocabulary())
    base = build_tiny_causal_lm(SHAPES["tiny"], tok, seed=0).to(device)
    prompts = ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"]
    torch.manual_seed(0)
    rollout = sample(base, tok, prompts, 4, 5, 1.0)
    rewards = torch.randn(8, generator=torch.Generator().manual_seed(1))
    scores = Scores(rewards, torch.zeros(8, 3))
    micro = load_config(Path(__file__).resolve().parents[1] / "config" / "micro.yaml")["grpo"]
    runs = []
    for g in (gamma, 2 * gamma):
        s = GRPOSettings(**{**micro, "group_size": 4, "max_new_tokens": 5, "gr_gamma": g, "gr_eps": 1e-3,
                            "gr_estimator": estimator, "backend": backend, "lr": 1e-3})
        update = make_update(copy.deepcopy(base).to(torch.bfloat16), s, Dist(device=torch.device(device)))
        seen = {}
        for name in ("write", "write_rank_average"):  # the gradient GR writes: whole (hvp) ...
            def spy(params, grads, real=getattr(update, name)):
                seen["written"] = torch.cat([x.detach().double().flatten().cpu() for x in grads])
                return real(params, grads)
            setattr(update, name, spy)

        def combine_spy(params, fn, real=update.combine):  # ... or one parameter at a time (the finite difference)
            parts = []

            def recorded(i, g):
                out = fn(i, g)
                parts.append(out.detach().double().flatten().cpu())
                return out
            real(params, recorded)
            seen["written"] = torch.cat(parts)
        update.combine = combine_spy
        step, params = update.step, [p for p in update.model.parameters() if p.requires_grad]

        def recording_step(step=step, params=params, update=update):
            seen["applied"] = torch.cat([x.detach().double().flatten().cpu() for x in update.read(params)])
            return step()
        update.step = recording_step
        grpo_step(update, Dist(device=torch.device(device)), rollout, scores, None, 0.0, s)
        runs.append((seen["written"], seen["applied"]))
        update.close()
        if hasattr(update, "engine"):
            from rlhf.distributed import destroy_process_group
            destroy_process_group()
    term, applied = runs[1][0] - runs[0][0], runs[1][1] - runs[0][1]
    return 1 - ((applied - term).norm() / term.norm()).item()


def hub_shaped_load(device: str, folder: Path) -> str:
    """A Qwen2.5-shaped folder (Qwen2Tokenizer, chat template, tied embeddings; rlhf/rehearsal/standins.py) through
    the pipeline's own loaders in bf16 on the device, sampling a completion: what a hub model takes."""
    import torch

    from rlhf.generation import sample
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rehearsal.standins import STANDINS, build_model, build_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer("qwen", ["SUBREDDIT: r/tifu TITLE: a post TL;DR: a summary <|im_end|>"] * 20, folder)
    build_model(STANDINS["qwen"], tok, seed=0).save_pretrained(folder)
    tok, model = load_tokenizer(folder), load_causal_lm(folder, "bfloat16", device)
    rollout = sample(model, tok, ["TL;DR: a post"], 2, 8, 1.0)
    assert next(model.parameters()).dtype == torch.bfloat16 and rollout.completion_ids.shape[0] == 2
    return f"{type(tok).__name__}, {sum(p.numel() for p in model.parameters())} parameters, sampled on {device}"


NCCL_PROBE = """
import os, torch, torch.distributed as td
td.init_process_group("nccl")
rank = td.get_rank()
torch.cuda.set_device(rank)
x = torch.full((4,), float(rank + 1), device="cuda")
td.all_reduce(x)
assert x.tolist() == [3.0] * 4, x
td.destroy_process_group()
"""


def device_checks(device: str, root: Path, config: Path, logs: Path) -> dict:
    """{check: (ok, detail)}: GR's correction survives a bf16 update on both backends and estimators; a hub-shaped
    model loads and samples; two NCCL processes all-reduce (with 2 GPUs); GRPO samples with vLLM (where installed)."""
    import importlib.util

    import torch
    out = {}

    def check(name, fn):
        try:
            out[name] = (True, fn())
        except Exception as e:  # noqa: BLE001 - a failed check is reported by name, the run goes on
            out[name] = (False, f"{type(e).__name__}: {e}"[:300])
        print(f"gpu-smoke: check {name}: {'ok' if out[name][0] else 'FAILED'} ({out[name][1]})")
    for backend in BACKENDS:
        for estimator in ("finite_difference", "hvp"):
            def share(backend=backend, estimator=estimator):
                value = gr_correction_share(device, backend, estimator)
                if value < 0.999:
                    raise AssertionError(f"share {value:.4f}: bf16 rounded GR's correction away")
                return f"share {value:.4f}"
            check(f"GR correction in a bf16 update ({backend}, {estimator})", share)
    check("hub-shaped model (Qwen2Tokenizer, chat template) loads and samples", lambda: hub_shaped_load(
        device, root / "hub-shaped"))
    if device.startswith("cuda") and torch.cuda.device_count() >= 2:
        def nccl():
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   "2", "-c", NCCL_PROBE], capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise RuntimeError(done.stderr[-300:])
            return "2 ranks all-reduced"
        check("NCCL, 2 processes", nccl)
    else:
        out["NCCL, 2 processes"] = (True, "skipped: needs 2 GPUs")
    if importlib.util.find_spec("vllm") is not None and device.startswith("cuda"):
        def vllm():
            ok, seconds = run_stage(config, logs, "grpo", "--method", "noreg-torch", "--seed", "1",
                                    "grpo.generation=vllm", "grpo.steps=2")
            if not ok:
                raise RuntimeError(f"see {logs}/grpo_noreg-torch_1.log")
            return f"GRPO sampled with vLLM ({seconds:.0f} s)"
        check("vLLM generation in GRPO", vllm)
    return out


def markdown(table: dict, stages: dict, shape: str, device: str, checks: dict | None = None) -> str:
    lines = [f"gpu-smoke: {shape} shape, bf16, device {device}", "",
             "| method | backend | generate s | score s | update s | step s | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        method, backend = name.rsplit("-", 1)
        peak = "–" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {method} | {backend} | " + " | ".join(f"{r[k]:.3f}" for k in
                                                              ("generate", "score", "update", "step")) + f" | {peak} |")
    lines += ["", "| stage | seconds | ok |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.0f} | {'yes' if v['ok'] else 'FAILED'} |" for k, v in stages.items()]
    if checks:
        lines += ["", "| check | ok | detail |", "|---|---|---|"]
        lines += [f"| {k} | {'yes' if ok else 'FAILED'} | {detail} |" for k, (ok, detail) in checks.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per method (the first is not timed)")
    p.add_argument("--results", default="results", help="results_dir; the run goes to <results>/gpu-smoke")
    p.add_argument("--no-checks", dest="checks", action="store_false",
                   help="skip the device checks (GR in bf16, a hub-shaped load, NCCL with 2 GPUs, vLLM)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"unknown method(s) {', '.join(unknown)}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("gpu-smoke: no CUDA device is visible (use --device cpu for the CPU path)")
            return 1
    root = Path(args.results) / "gpu-smoke"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config(Path(args.results), args.device, args.shape, methods, args.steps),
                                     sort_keys=False))
    stages, table = {}, {}

    def stage(key: str, *cmd: str) -> bool:
        ok, seconds = run_stage(config, logs, *cmd)
        stages[key] = {"ok": ok, "seconds": seconds}
        return ok

    if all(stage(s, s) for s in ("data", "base", "sft", "sample", "label", "rm")):
        cfg = yaml.safe_load(config.read_text())
        for name in cfg["methods"]:
            if stage(f"grpo {name}", "grpo", "--method", name, "--seed", "0"):
                table[name] = grpo_row(root / "grpo" / name / "seed0" / "metrics.jsonl")
        first = next(iter(cfg["methods"]))
        stage(f"evaluate {first}", "evaluate", "--method", first, "--seed", "0")
        stage("certify", "certify")
    checks = device_checks(args.device, root, config, logs) if args.checks else {}
    failed = [k for k, v in stages.items() if not v["ok"]] + [k for k, (ok, _) in checks.items() if not ok]
    failed += [f"grpo {k} (no sharpness / on-policy diagnostics)" for k, r in table.items()
               if not (r["sharpness"] and r["onpolicy"])]
    text = markdown(table, stages, args.shape, args.device, checks)
    (root / "smoke.md").write_text(text)
    (root / "smoke.json").write_text(json.dumps({"grpo": table, "stages": stages, "failed": failed,
                                                 "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()}},
                                                indent=2))
    print(text)
    if failed:
        print(f"gpu-smoke: FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
