from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from rlhf.distributed import Dist, trainer_deepspeed_config
from rlhf.models import attach_behavior_head, device_from_config, load_reward_model, load_tokenizer
from rlhf.rewards.proxy_rm import BSPOScorer, RewardScorer
from rlhf.settings import TrainerSettings


def setup(cfg: dict, args, seed: int | None = None, device: bool = True) -> torch.device | None:
    """Threads, seeds and (device=True: for a stage that declares resources.device) the device of a stage process."""
    threads = getattr(args, "threads", None) or cfg["resources"]["threads"]
    torch.set_num_threads(threads)
    seed = cfg["seed"] if seed is None else seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device_from_config(cfg) if device else None


def tokenizer_of(folder, cfg: dict):
    """The tokenizer saved with a model folder (the SFT policy's, for every stage after SFT)."""
    return load_tokenizer(folder, pad_token=cfg["model"]["pad_token"])


TRAINER_WEIGHTS = "float32"  # SFT and RM train fp32 weights; model.dtype sets their mixed precision


def load_proxy(folder, cfg: dict, tokenizer, device) -> RewardScorer:
    """The trained proxy RM (frozen) behind the scorer that returns rewards and features."""
    model = load_reward_model(folder, tokenizer, cfg["model"]["dtype"], device)
    return RewardScorer(model.eval().requires_grad_(False), tokenizer, cfg["rm"]["batch_size_scoring"])


def load_bspo(folder: Path, cfg: dict, settings, tokenizer, device) -> BSPOScorer:
    """BSPO's reward: the ScoreLM (frozen) with its LM head; r_min from its metrics unless the method sets one."""
    model = load_reward_model(folder, tokenizer, cfg["model"]["dtype"], device)
    attach_behavior_head(model, folder)
    r_min = settings.bspo_r_min
    if r_min is None:
        r_min = json.loads((Path(folder) / "metrics.json").read_text())["r_min_train"]
    return BSPOScorer(model.eval().requires_grad_(False), tokenizer, cfg["rm"]["batch_size_scoring"],
                      settings.bspo_threshold, r_min)


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
    dtype = cfg["model"]["dtype"]
    return dict(learning_rate=section.lr, num_train_epochs=section.epochs,
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
