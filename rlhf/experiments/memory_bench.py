"""Peak memory of one GRPO update per method at a model's shape, on the CPU, and what holds it.

    python -m rlhf.experiments.memory_bench [--shape Qwen/Qwen2.5-0.5B] [--dtype bfloat16] [--rows 16]
        [--micro-batch 8] [--prompt 256] [--completion 53] [--methods noreg gr ...] [--out results/bench-memory]

Each method runs in a process forked after the imports (memory another method freed would otherwise be reused
unseen), with a randomly initialised model of the shape (rlhf/models.py KNOWN, or `tiny`), random token ids for
the rollouts (sampling is not what is measured) and what the GRPO stage holds for that method: pi_init, the reward
models (one proxy RM; UWO's members; BSPO's ScoreLM instead), pi_ref (Reference Resets), the fp32 EMA (Elastic
Reset). Memory is Linux's resident set: its peak (VmHWM, reset where a part starts) and the growth of each part, with
glibc's mmap threshold at 64 KiB (mallopt, in the measuring process) so that every tensor is its own mapping and a freed one
leaves: the numbers are those of the live tensors, the same to the MiB from run to run. Parts: `weights` (the
policy), `held models`, `update state` (the backend's master copies), `after one update` (AdamW's states, which the
first update makes, and the gradients it leaves), `step` (the second update's growth over rows/micro-batch
micro-batches, as every later update runs: activations, gradients, the method's own extras: GR's g1 and saved weights
or double-backward graph, SignCert's features, KL's reference log-probs). With `--timed K`, `--repeats` rounds more
in rotated order, each method in a fresh fork under glibc's default allocator: one update, then K timed ones (the
whole update: KL's reference forward pass, GR's second gradient, SignCert's worst case; not the scoring, where UWO's
members and BSPO's ScoreLM cost). Writes <out>/memory.json and memory.md.
No GPU was lent to measure the same there (CUDA's allocator and NCCL buffers come on top).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

from rlhf.config import load_config
from rlhf.distributed import Dist, make_update
from rlhf.generation import Rollout
from rlhf.models import KNOWN, Shape
from rlhf.policy import token_logprobs
from rlhf.rewards.proxy_rm import Scores
from rlhf.settings import GRPOSettings
from rlhf.stats import spread
from rlhf.trainer import grpo_step

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
TINY = Shape(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=2048, vocab=1024, tied=True)
SMALL = dataclasses.replace(TINY, hidden=256, layers=2, heads=4, kv_heads=4, intermediate=1024)  # the test's
# each method: the GRPO settings it changes, and what the stage holds for it beyond pi_init and one proxy RM
METHODS = {
    "noreg": ({}, {}),
    "kl": ({"kl_beta": 0.05}, {}),
    "resets": ({"kl_beta": 0.05, "reset_every": 50}, {"pi_ref": 1}),
    "gr": ({"gr_gamma": 1e-3}, {}),
    "gr-hvp": ({"gr_gamma": 1e-3, "gr_estimator": "hvp"}, {}),
    "signcert": ({"signcert_quantile": 0.4, "kl_beta": 0.01}, {}),
    "elastic": ({"kl_beta": 0.05, "elastic_reset_every": 25, "elastic_reset_decay": 0.9}, {"ema": 1}),
    "uwo": ({}, {"rms": 3}),
    "advpo": ({}, {}),
    "bspo": ({}, {"rms": 0, "score_lm": 1}),
}


def _kib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from the current RSS
    return _kib("VmRSS")


def _shape(name: str) -> Shape:
    return {"tiny": TINY, "small": SMALL}.get(name) or KNOWN[name]


def _models(shape: Shape, dtype: torch.dtype):
    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = "sdpa"
    head = copy.deepcopy(config)
    head.num_labels = 1
    return (lambda: AutoModelForCausalLM.from_config(config).to(dtype),
            lambda: AutoModelForSequenceClassification.from_config(head).to(dtype).eval().requires_grad_(False))


def measure(method: str, shape: Shape, dtype: torch.dtype, rows: int, micro: int, prompt: int, completion: int,
            group: int = 8, timed: int = 0) -> dict:
    """One method's parts and peak (bytes), in this process: run it in a fresh fork. With `timed`, instead the median
    wall-clock and CPU seconds of that many updates after the first, under glibc's default allocator."""
    if not timed:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    changes, holds = METHODS[method]
    micro_cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "micro.yaml")["grpo"]  # every field
    s = GRPOSettings(**{**micro_cfg, "group_size": group, "prompts_per_step": rows // group, "micro_batch_size": micro,
                        "max_new_tokens": completion, "backend": "torch", **changes})
    new_lm, new_rm = _models(shape, dtype)
    _models(dataclasses.replace(shape, hidden=8, heads=1, kv_heads=1, layers=1, intermediate=8, vocab=8),
            dtype)[0]()  # transformers imports a model's module when it first builds one: not the model's memory
    parts, start = {}, _reset_peak()
    mark = start

    def part(name: str) -> None:
        nonlocal mark
        now = _kib("VmRSS")
        parts[name] = now - mark
        mark = now
    torch.manual_seed(0)
    policy = new_lm()
    part("weights")
    held = [copy.deepcopy(policy).eval().requires_grad_(False)]  # pi_init
    held += [copy.deepcopy(held[0]) for _ in range(holds.get("pi_ref", 0))]
    held += [[p.detach().float().clone() for p in policy.parameters()] for _ in range(holds.get("ema", 0))]
    held += [new_rm() for _ in range(holds.get("rms", 1))]
    held += [new_lm().eval().requires_grad_(False) for _ in range(holds.get("score_lm", 0))]
    part("held models")
    update = make_update(policy, s, Dist())
    part("update state")
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(torch.randint(2, shape.vocab, (rows, prompt), generator=g), torch.ones(rows, prompt, dtype=torch.long),
                      torch.randint(2, shape.vocab, (rows, completion), generator=g),
                      torch.ones(rows, completion, dtype=torch.long), [""] * rows)
    scores = Scores(torch.randn(rows, generator=g), torch.randn(rows, shape.hidden, generator=g))

    def step() -> None:
        with torch.no_grad():
            ref = token_logprobs(held[0], rollout) if s.kl_beta else None
        grpo_step(update, Dist(), rollout, scores, ref, s.kl_beta, s)
    step()  # the first update makes AdamW's states: every later one runs beside them, as this second one
    part("after one update")
    if timed:  # instead of the memory: `timed` updates after that first one
        wall, cpu = [], []
        for _ in range(timed):
            w, c = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        return {"update_s": float(np.median(wall)), "update_cpu_s": float(np.median(cpu))}
    before_step = _reset_peak()
    step()
    parts["step"] = _kib("VmHWM") - before_step
    return {"parts": parts, "peak": before_step - start + parts["step"],
            "params": sum(p.numel() for p in policy.parameters())}


def _fork(method: str, shape: Shape, dtype: torch.dtype, args, timed: int) -> dict | None:
    """measure() in a fresh child; None where the child died (the kernel's OOM killer: a method that does not fit)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child measures and reports through the pipe
        os.close(read)
        out = measure(method, shape, dtype, args.rows, args.micro_batch, args.prompt, args.completion, timed=timed)
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        print(f"memory bench: {method} failed (wait status {status}: signal {status & 0x7f} is 9 where the OOM killer "
              f"ended it)", file=sys.stderr)
        return None
    return json.loads(text)


def run(args) -> tuple[dict, list[str]]:
    """Each method's results, and the methods whose measuring process died (did not fit).
    Each method once for its memory (the same to the MiB from run to run); with --timed, --repeats rounds in
    rotated order (a drift of the machine lands on different methods in different rounds), each method's update
    seconds per round and, per round, its ratio to noreg's (rlhf/stats.py's spread over the rounds)."""
    torch.set_num_threads(args.threads)
    shape, dtype = _shape(args.shape), getattr(torch, args.dtype)
    if args.layers:  # the shape's width and vocabulary with fewer layers: what a part costs per layer, where the
        shape = dataclasses.replace(shape, layers=args.layers)  # whole model does not fit this machine
    results, methods, failed = {}, list(args.methods), []
    for method in methods:
        print(f"{method}: measuring one update's memory ...", flush=True)  # minutes per method at 0.5B on a CPU
        out = _fork(method, shape, dtype, args, 0)
        if out is None:  # the others are still measured; the table says which did not fit
            failed.append(method)
            continue
        results[method] = {**out, "rounds": []}
        print(f"{method}: peak {results[method]['peak'] / 2**20:.0f} MiB", flush=True)
    methods = [m for m in methods if m in results]
    for r in range(args.repeats if args.timed else 0):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            out = _fork(method, shape, dtype, args, args.timed)
            if out is None:
                raise RuntimeError(f"memory bench: {method}'s timed run died after its memory run had passed")
            results[method]["rounds"].append({k: out[k] for k in ("update_s", "update_cpu_s")})
            print(f"round {r + 1}: {method}: update {out['update_s']:.2f} s", flush=True)
    for method, res in results.items():
        if res["rounds"]:
            res["update_s"] = float(np.median([x["update_s"] for x in res["rounds"]]))
            res["update_cpu_s"] = float(np.median([x["update_cpu_s"] for x in res["rounds"]]))
            if "noreg" in results:
                res["time_ratio"] = spread([a["update_s"] / b["update_s"]
                                            for a, b in zip(res["rounds"], results["noreg"]["rounds"])])
    return results, failed


def markdown(results: dict, args, failed: list[str] = ()) -> str:
    gib = 2 ** 30
    base = results["noreg"]["peak"] if "noreg" in results else None  # no ratio without noreg in the same run
    timed = bool(args.timed)
    n = next(iter(results.values()))["params"]
    names = list(next(iter(results.values()))["parts"])
    layers = f" with {args.layers} layer{'s' * (args.layers != 1)}" if args.layers else ""
    lines = [f"{args.shape}{layers} ({n / 1e6:.0f}M parameters), {args.dtype}, {args.rows} completions of "
             f"{args.prompt} + {args.completion} tokens in micro-batches of {args.micro_batch}, torch backend, CPU, GiB:", "",
             "| method | " + " | ".join(names) + " | peak | / noreg |" + timed * " update s | / noreg (min-max) |",
             "|---|" + "---|" * (len(names) + 2 + 2 * timed)]
    for method, r in results.items():
        row = (f"| {method} | " + " | ".join(f"{r['parts'][k] / gib:.2f}" for k in names)
               + f" | {r['peak'] / gib:.2f} | " + (f"{r['peak'] / base:.2f} |" if base else "– |"))
        if timed:
            q = r.get("time_ratio")
            row += f" {r['update_s']:.2f} | " + (f"{q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) |" if q else "– |")
        lines.append(row)
    lines += [f"| {method} | " + "– | " * len(names) + "killed (did not fit) | – |" + " – | – |" * timed
              for method in failed]
    if timed:
        lines += ["", f"update s: the median over {args.repeats} round(s) of each round's median over {args.timed} "
                      "updates after a first (wall clock, fresh processes); the ratio pairs the two rows of one round."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m rlhf.experiments.memory_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="Qwen/Qwen2.5-0.5B", choices=["tiny", "small", *KNOWN], help="a model of rlhf/models.py KNOWN, or tiny (17M) / small (3M)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=None,
                   help="the shape with this many decoder layers (default: the shape's own)")
    p.add_argument("--rows", type=int, default=16, help="completions per update (this rank's)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--completion", type=int, default=53, help="completion tokens (GR paper's TL;DR: 53)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timed", type=int, default=0, help="time this many more updates per method (0: memory only)")
    p.add_argument("--repeats", type=int, default=3, help="with --timed: independent rounds, in rotated order")
    p.add_argument("--out", default="results/bench-memory")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers {args.layers}: a shape needs at least one decoder layer")
    if not Path("/proc/self/clear_refs").exists():
        p.error("needs Linux's /proc/self/clear_refs (the peak resident memory is reset per part)")
    results, failed = run(args)
    if not results:
        print("memory bench: every method failed", file=sys.stderr)
        return 1
    table = markdown(results, args, failed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"args": vars(args), "results": results, "failed": failed}, indent=1))
    (out / "memory.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
