"""Typed settings of the GRPO stage: a frozen dataclass built from the validated config.

Documentation, defaults and allowed values of every field live in workflow/schemas/config.schema.yaml ($defs.grpo);
tests/test_config.py checks that these fields are exactly the schema's, so the two cannot drift. A method's settings
are the `grpo` section with the method's overrides applied.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlhf.errors import ConfigError


@dataclass(frozen=True)
class GRPOSettings:
    # schedule and batch
    steps: int
    prompts_per_step: int             # B
    group_size: int                   # G completions per prompt
    max_new_tokens: int               # T_max: also the loss normalizer B*G*T_max
    temperature: float
    # optimizer
    lr: float
    weight_decay: float
    clip_eps: float
    max_grad_norm: float
    micro_batch_size: int             # 0: a rank's whole share in one forward/backward
    backend: str                      # auto | torch | deepspeed
    zero_stage: int
    # KL penalty, Reference Resets, scheduled-beta ablation
    kl_beta: float
    reset_every: int
    kl_beta_decay_every: int
    # gradient regularization (rlhf/algorithms/gr.py)
    gr_gamma: float
    gr_estimator: str                 # finite_difference | hvp
    gr_eps: float
    gr_g1_clip: float
    gr_g2_clip: float
    gr_excluded_grad: str             # g1 | g2 | g2_raw
    gr_second_pass_ratio: str         # one | stored
    gr_refresh_master_weights: bool
    # SignCert-PO (rlhf/algorithms/signcert.py)
    signcert_quantile: float | None   # None: off
    signcert_epsilon_from: str        # radius | inverse_radius
    signcert_quantile_over: str       # nonzero | all
    signcert_clip_negative: bool
    # diagnostics and evaluation beside training
    sharpness_every: int
    sharpness_perturbations: int
    sharpness_radius: float
    sharpness_prompts: int
    kl_metric_every: int
    eval_every: int
    eval_prompts: int
    checkpoint_every: int
    # sampling engine
    generation: str                   # hf | vllm
    vllm_gpu_memory_utilization: float
    vllm_max_model_len: int | None
    vllm_kv_cache_gib: float | None
    vllm_enforce_eager: bool | None
    vllm_sleep: bool

    @classmethod
    def for_method(cls, cfg: dict, method: str) -> "GRPOSettings":
        """The grpo section with the method's overrides applied (cfg is a validated config)."""
        if method not in cfg["methods"]:
            raise ConfigError(f"method '{method}' is not in config.methods (have: {', '.join(cfg['methods'])})")
        return cls(**{**cfg["grpo"], **cfg["methods"][method]})

    def replace(self, **changes) -> "GRPOSettings":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
