"""plan: what each GPU job of an experiment will ask of its GPU and of Slurm, before submitting it.

    python -m rlhf plan --config config/paper/gr-alpaca-qwen2.5-3b.yaml --gpu-gib 80

Per stage with GPUs, an estimate of the peak memory of one rank, by what holds it, from the model's shape (its
config.json from the hub cache or a folder; the papers' models are known without it) and the config's batch, lengths,
precision and method; a warning line for every job whose estimate exceeds --gpu-gib. Then the Slurm shape: GPUs per
node and runtime against the partition (read with `sinfo` where it exists), and what a cluster needs that the config
does not say (account, partition).

The estimate (bytes, N parameters, R ranks, bf16 weights with fp32 master weights as the stages run them):
  trainer stages (sft, rm, bspo, dpo; DeepSpeed ZeRO-2): 2N weights, (4 + 8)N/R master and Adam, 4N/R fp32 gradients,
    activations of one per-rank batch; dpo adds its frozen reference (2N);
  grpo: the same update state, pi_init (2N; pi_ref 2N more with Reference Resets), the proxy reward (2N_rm; UWO's
    members, BSPO's ScoreLM), the gold on rank 0 while it evaluates (2N_gold), the KV cache of the rank's B*G/R
    completions while sampling, one micro-batch's activations and fp32 logits, and GR's extras: the finite difference
    holds g1 as a full fp32 copy (4N; g2 is the gradient a plain update has too, and the final gradient replaces it
    one parameter at a time; the perturbed weights are restored from the fp32 master copies, or from a copy of their
    own, 2N more, under gr_refresh_master_weights), hvp g1 and H.g1 (8N) with the double backward's
    activations on SDPA's math kernel, which stores every layer's L x L attention;
  activations per layer and token (Korthikanti et al. 2022, no recomputation): 34 h bytes, plus 5 a L bytes where the
  attention matrix is kept (math kernel), a the heads, L the sequence length.
Checked against the measured peak of a GRPO step on the CPU for a 17M-parameter shape (tests/test_plan.py: the
measured peak was 1.1-1.4 times the estimate for noreg, GR and hvp with glibc's default allocator settings, 0.93-1.09
times for the live tensors alone; a warning keeps a 1.4 margin). On a GPU it is an
estimate only, not measured here (no GPU was lent): CUDA's allocator and NCCL buffers come on top.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from rlhf.cluster import job_spec, ranks
from rlhf.data import miniature_tokenizer
from rlhf.models import KNOWN, Shape
from rlhf.registry import ensemble_members, used_stages
from rlhf.settings import GRPOSettings

GIB = 2 ** 30




def policy_shape(cfg: dict) -> Shape:
    """The policy's shape: model.name's, or the miniature's model.build."""
    if "build" in cfg["model"]:
        b = cfg["model"]["build"]
        vocab = max(len(miniature_tokenizer(cfg)), b.get("vocab_size") or 0)
        return Shape(b["hidden_size"], b["num_layers"], b["num_heads"], b.get("num_key_value_heads") or b["num_heads"],
                     b["intermediate_size"], vocab, True, "gpt_neox" if b["arch"] == "gpt_neox" else "llama")
    return shape_of(cfg["model"]["name"])


def shape_of(name: str) -> Shape:
    """A model's shape: a folder's config.json, the papers' models from KNOWN, else the hub cache's config.json."""
    folder = Path(name)
    if (folder / "config.json").is_file():
        return Shape.of_config(json.loads((folder / "config.json").read_text()))
    if name in KNOWN:
        return KNOWN[name]
    from huggingface_hub import hf_hub_download  # only for a model neither local nor known: the hub cache
    return Shape.of_config(json.loads(Path(hf_hub_download(name, "config.json")).read_text()))


def activations(s: Shape, batch: int, length: int, attention_kept: bool, dtype_bytes: int = 2) -> float:
    """One forward's stored activations (bytes): per layer and token 34 h (+ 5 a L with the attention kept), in
    half precision; scaled for float32."""
    per_token = 34 * s.hidden + (5 * s.heads * length if attention_kept else 0)
    return s.layers * batch * length * per_token * dtype_bytes / 2


def update_state(n: int, world: int, weight_bytes: int) -> dict:
    """Weights and the optimizer's share on one rank (ZeRO-2 partitions master weights, Adam and gradients)."""
    if weight_bytes == 4:  # float32 weights: no master copy
        return {"weights": 4 * n, "adam states": 8 * n / world, "gradients": 4 * n / world}
    return {"weights": weight_bytes * n, "fp32 master weights": 4 * n / world, "adam states": 8 * n / world,
            "fp32 gradients": 4 * n / world}


# hvp's double backward keeps the first backward's graph besides the forward's activations: measured on the CPU
# (tests/test_plan.py, fp32, SDPA math kernel), about 5-6 times one forward's (6: the estimate then reads 0.93x the
# peak of the live tensors).
HVP_GRAPH = 6
# The measured peak of a GRPO step on the CPU was 1.1-1.4 times this estimate with glibc's default allocator settings
# (freed memory kept resident), 1.09 for the live tensors alone: the margin `plan` keeps below --gpu-gib.
MARGIN = 1.4
TYPICAL_PROMPT_TOKENS = 512  # when the data is not there to measure (TL;DR posts; RLVR chat prompts are shorter)


def grpo_memory(cfg: dict, method: str, world: int, prompt_tokens: int = TYPICAL_PROMPT_TOKENS) -> dict:
    """The components of one GRPO rank's peak (bytes)."""
    s, g = policy_shape(cfg), GRPOSettings.for_method(cfg, method)
    b = 2 if cfg["model"]["dtype"] in ("bfloat16", "float16") else 4
    n = s.params
    rows = g.prompts_per_step * g.group_size // world
    micro = g.micro_batch_size or rows
    length = prompt_tokens + g.max_new_tokens
    out = update_state(n, world, b)
    out["pi_init"] = b * n
    if g.reset_every:
        out["pi_ref"] = b * n
    if "rlvr" not in cfg:
        members = ensemble_members(cfg) if g.reward == "uwo" else []  # UWO holds K member RMs
        rm = shape_of(cfg["ensemble"]["model"]).params if members and cfg["ensemble"]["model"] else n
        out["reward models"] = b * rm * max(len(members), 1)
        if cfg["gold"]["type"] == "reward_model":
            out["gold (rank 0, evaluations)"] = b * shape_of(cfg["gold"]["name"]).params
    hd = s.hidden // s.heads
    out["KV cache (sampling)"] = rows * length * s.layers * 2 * s.kv_heads * hd * b
    hvp = g.gr_gamma > 0 and g.gr_estimator == "hvp"
    out["activations (one micro-batch)"] = activations(s, micro, length, attention_kept=hvp, dtype_bytes=b) * (
        HVP_GRAPH if hvp else 1)
    out["logits (fp32, one micro-batch)"] = micro * length * s.vocab * 4 * 2
    if g.gr_gamma > 0:
        # the finite difference: g1 in fp32, and a copy of the perturbed weights only where no exact fp32 master
        # copy can restore them (fp32 weights; the authors' refresh of the masters from the perturbed weights)
        saved = b if b == 4 or g.gr_refresh_master_weights else 0
        # hvp: g1 in fp32 (it becomes v, then the GR gradient, in place) and H v: in the weights' dtype as computed
        # from one micro-batch, an fp32 accumulator over several (rlhf/algorithms/gr.py hvp_gr)
        out["GR extras"] = (4 + (4 if micro < rows else b)) * n if hvp else (4 + saved) * n
    if g.generation == "vllm":
        out["vLLM (utilization share)"] = g.vllm_gpu_memory_utilization * 80 * GIB
    return out


def trainer_memory(cfg: dict, stage: str, world: int) -> dict:
    section = {"rm_member": "rm", "bspo": "rm"}.get(stage, stage)
    s = policy_shape(cfg)
    if stage == "rm_member" and cfg.get("ensemble", {}).get("model"):
        s = shape_of(cfg["ensemble"]["model"])
    n, b = s.params, 2 if cfg["model"]["dtype"] in ("bfloat16", "float16") else 4
    out = update_state(n, world, b)
    batch = max(cfg[section]["batch_size"] // world, 1) * (2 if section in ("rm", "dpo") else 1)  # pairs: 2 rows
    out["activations"] = activations(s, batch, cfg[section]["max_length"], attention_kept=False, dtype_bytes=b)
    out["logits (fp32)"] = batch * cfg[section]["max_length"] * s.vocab * 4 * 2 if stage in ("sft", "dpo", "bspo") else 0
    if stage == "dpo":
        out["reference model"] = b * n
    return out


def inference_memory(cfg: dict, stage: str) -> dict:
    s = policy_shape(cfg)
    b = 2 if cfg["model"]["dtype"] in ("bfloat16", "float16") else 4
    out = {"policy": b * s.params}
    if stage in ("evaluate", "certify") and "rlvr" not in cfg:
        out["proxy RM"] = b * s.params
    if stage != "sample" and cfg["gold"]["type"] == "reward_model" and stage in ("label", "evaluate", "certify"):
        out["gold"] = b * shape_of(cfg["gold"]["name"]).params
    return out


def plan(cfg: dict, gpu_gib: float) -> tuple[list[dict], list[str]]:
    """Per GPU job: {stage, method, ranks, gib, parts}; and the warning lines."""
    rows, warnings = [], []
    for stage in used_stages(cfg):
        if not job_spec(cfg, stage)["gpus"] or stage in ("data", "base", "report", "advpo"):
            continue
        world = ranks(cfg, stage)
        if stage == "grpo":
            entries = [(m, grpo_memory(cfg, m, world)) for m in cfg["methods"]]
        elif stage in ("sft", "rm", "rm_member", "bspo", "dpo"):
            if stage == "sft" and not cfg["sft"]["epochs"]:
                continue
            entries = [("", trainer_memory(cfg, stage, world))]
        else:
            entries = [("", inference_memory(cfg, stage))]
        for method, parts in entries:
            total = sum(parts.values()) / GIB
            rows.append({"stage": stage, "method": method, "ranks": world, "gib": total,
                         "parts": {k: v / GIB for k, v in parts.items() if v}})
            if total * MARGIN > gpu_gib:
                top = max(parts, key=parts.get)
                warnings.append(f"plan: {stage}{' ' + method if method else ''}: ~{total:.0f} GiB per rank (x{MARGIN} "
                                f"margin: {total * MARGIN:.0f}) on {gpu_gib:.0f} GiB GPUs (largest: {top}, "
                                f"{parts[top] / GIB:.0f} GiB): expect out-of-memory; lower micro_batch_size or "
                                "lengths, or use larger GPUs")
    warnings += slurm_shape(cfg)
    return rows, warnings


def slurm_shape(cfg: dict) -> list[str]:
    """GPUs per node and runtime against the partitions `sinfo` reports (where it exists), and what the cluster
    needs that the config cannot know."""
    lines, partitions = [], {}
    if shutil.which("sinfo"):
        out = subprocess.run(["sinfo", "-h", "-o", "%P %l %G"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name, limit, gres = (line.split() + ["", "", ""])[:3]
            gpus = max((int(x.rsplit(":", 1)[-1].split("(")[0]) for x in gres.split(",") if x.startswith("gpu")),
                       default=0)
            partitions[name.rstrip("*")] = (limit, gpus)
    for rule in used_stages(cfg):
        spec = job_spec(cfg, rule)
        chosen = [partitions[spec["partition"]]] if spec.get("partition") in partitions else list(partitions.values())
        if spec["gpus"] > 4 and not any(g >= spec["gpus"] for _, g in chosen):
            lines.append(f"plan: resources.jobs.{rule}: {spec['gpus']} GPUs on one node" + (
                f", and no partition here has more than {max((g for _, g in chosen), default=0)}" if chosen else
                " cannot be placed on 4-GPU nodes (e.g. GH200)") +
                f": set nodes: {-(-spec['gpus'] // 4)} with gpus: 4 (batch sizes stay global)")
        if spec["runtime"] > 1440:
            lines.append(f"plan: resources.jobs.{rule}: runtime {spec['runtime']} min exceeds many partitions' MaxTime "
                         "(often 24 h): set your partition's limit; GRPO resumes from its last checkpoint when the "
                         "profile's retries or slurm-requeue restart it")
    lines.append("plan: Slurm needs an account and a partition the config cannot know: snakemake --profile profiles/slurm "
                 "--default-resources slurm_account=<account> slurm_partition=<partition> (or resources.jobs.<rule>."
                 "partition)")
    return lines


def run(cfg, args):
    rows, warnings = plan(cfg, args.gpu_gib)
    print(f"{'stage':<10} {'method':<16} {'ranks':>5} {'GiB/rank':>9}  largest parts")
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["parts"].items(), key=lambda kv: -kv[1])[:4])
        print(f"{r['stage']:<10} {r['method'][:16]:<16} {r['ranks']:>5} {r['gib']:>9.1f}  {parts}")
    for line in warnings:
        print(line)
