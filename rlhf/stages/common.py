from __future__ import annotations

import random
import shutil

import numpy as np
import torch

from rlhf.distributed import Dist, trainer_deepspeed_config
from rlhf.errors import DataError
from rlhf.io import read_jsonl, write_json
from rlhf.metrics_log import write_trainer_log
from rlhf.models import device_from_config
from rlhf.rewards.proxy_rm import RewardScorer, split_by_prompt
from rlhf.settings import ModelSettings, TrainerSettings
from rlhf.stats import preference_metrics


def setup(cfg: dict, args, seed: int | None = None, device: bool = True) -> torch.device | None:
    """Threads, seeds and (device=True: for a stage that declares resources.device) the device of a stage process."""
    threads = getattr(args, "threads", None) or cfg["resources"]["threads"]
    torch.set_num_threads(threads)
    seed = cfg["seed"] if seed is None else seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device_from_config(cfg) if device else None


TRAINER_WEIGHTS = "float32"  # SFT and RM train fp32 weights; model.dtype sets their mixed precision


def hf_trainer_kwargs(cfg: dict, section: TrainerSettings, dist: Dist) -> dict:
    """Arguments shared by the SFT and RM trainers (TRL configs derive from transformers' TrainingArguments).

    Precision is the config's, by construction: the stage loads the model in float32 (fp32 master weights) and the
    Trainer runs bf16/fp16 mixed precision when model.dtype asks for it (autocast, or DeepSpeed's bf16 with fp32
    optimizer partitions). A bf16 model stepped by plain AdamW would lose every update below bf16's resolution, and
    TRL's own default (bf16 autocast and activation checkpointing) would silently override a float32 config.
    transformers 5 reads a warmup_steps below 1 as a fraction of the training steps (warmup_ratio is gone; the
    schema keeps the ratio below 1). On CUDA the Trainer runs DeepSpeed (section.backend, ZeRO-2 by default); under
    torchrun it is data parallel, and batch_size stays the global batch (each rank takes its share).
    """
    dtype = ModelSettings.of(cfg).dtype
    return dict(learning_rate=section.lr, num_train_epochs=section.epochs, weight_decay=section.weight_decay,
                adam_epsilon=section.adam_epsilon,
                per_device_train_batch_size=dist.per_rank(section.batch_size, "batch_size"),
                lr_scheduler_type=section.lr_scheduler, warmup_steps=section.warmup_ratio, logging_steps=10,
                save_strategy="no", report_to=[], seed=cfg["seed"], use_cpu=dist.device.type == "cpu",
                dataloader_num_workers=0, max_length=section.max_length,
                deepspeed=trainer_deepspeed_config(section.backend, section.zero_stage, dist.device),
                bf16=dtype == "bfloat16", fp16=dtype == "float16",
                gradient_checkpointing=section.gradient_checkpointing)


def trainer_engine(trainer) -> str:
    """How an HF Trainer ran, for the stage's log line."""
    ds = trainer.args.hf_deepspeed_config.config["zero_optimization"]["stage"] if trainer.is_deepspeed_enabled else None
    return f"{trainer.args.world_size} rank(s), " + (f"DeepSpeed ZeRO-{ds}" if ds is not None else "no DeepSpeed")


def release_trainer(trainer) -> None:
    """After an HF Trainer's last use, on every rank: its DeepSpeed engine destroyed (accelerate's free_memory), whose
    gradient hooks would otherwise keep the model, the engine and the process group alive to interpreter shutdown
    (rlhf.distributed.DeepSpeedUpdate.close)."""
    trainer.accelerator.free_memory()


# --- shared by the stages that train a reward model (rm, rm_member, bspo) ---

def training_pairs(cfg: dict, labels) -> tuple[list[dict], list[dict]]:
    """(held out, train): the labeled pairs split by prompt, the same split for the proxy, UWO's members and BSPO."""
    rows = read_jsonl(labels, required=("prompt", "chosen", "rejected"))
    eval_fraction = cfg["rm"]["eval_fraction"]
    heldout, train = split_by_prompt(rows, eval_fraction, cfg["seed"])
    if not train:
        raise DataError(f"{labels}: {len(rows)} labeled pairs leave nothing to train on after holding out "
                        f"{len(heldout)} (rm.eval_fraction = {eval_fraction})")
    return heldout, train


def heldout_accuracy(scorer: RewardScorer, rows: list[dict]) -> dict:
    prompts = [r["prompt"] for r in rows]
    chosen = scorer(prompts, [r["chosen"] for r in rows]).rewards.numpy()
    rejected = scorer(prompts, [r["rejected"] for r in rows]).rewards.numpy()
    margin = chosen - rejected
    accuracy, bt_loss = preference_metrics(margin)
    out = {"n_heldout": len(rows), "accuracy_vs_labels": accuracy, "bt_loss_vs_labels": bt_loss}
    if "gold_chosen" in rows[0]:
        gold_margin = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows])
        decided = gold_margin != 0
        out["accuracy_vs_gold_order"] = float(np.mean((margin[decided] > 0) == (gold_margin[decided] > 0)))
        out["n_gold_decided"] = int(decided.sum())
    return out


def save_trained(out, model, tokenizer, trainer, metrics: dict, cfg: dict, job: str, settings: dict) -> None:
    """Rank 0 after training: the model folder, its metrics.json and the trainer's log; one summary line."""
    shutil.rmtree(out / "trainer", ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "metrics.json", metrics)
    write_trainer_log(out / "train_log.jsonl", trainer.state.log_history, cfg, job, settings, summary=metrics)
    print(f"{job} ({trainer_engine(trainer)}): " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict)))
