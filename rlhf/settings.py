"""Typed settings of the stages: frozen dataclasses built from the validated config, one per config section.

Documentation, defaults and allowed values of every field live in workflow/schemas/config.schema.yaml (the section of
the same name; $defs.grpo for GRPO); tests/test_config.py checks that each class's fields are exactly its section's,
so the two cannot drift. A method's GRPO settings are the `grpo` section with the method's overrides applied.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from rlhf.errors import ConfigError
from rlhf.rewards.llm_judge import JudgeRewardSettings


class Section:
    """A config section as a frozen dataclass: `Cls.of(cfg)`; `as_dict()` for logs and wandb."""
    SECTION: ClassVar[str]

    @classmethod
    def of(cls, cfg: dict):
        return cls(**cfg[cls.SECTION])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def neutral():
    """A GRPO setting that does not change what the policy becomes: how long the run is and what is measured beside it
    (diagnostics run on their own random streams). A rerun that changes only these resumes its checkpoint, so a
    preempted run can be extended; any other change starts afresh (rlhf/trainer.py: fingerprint). GRPO's learning
    rate is constant, so the number of steps does not shape the trajectory."""
    return dataclasses.field(metadata={"trajectory_neutral": True})


@dataclass(frozen=True)
class TrainerSettings(Section):
    """What the SFT and RM stages give an HF Trainer (rlhf/stages/common.py: hf_trainer_kwargs)."""
    lr: float
    epochs: float
    batch_size: int                   # global batch: each rank takes its share
    warmup_ratio: float
    lr_scheduler: str
    weight_decay: float
    adam_epsilon: float
    max_length: int
    gradient_checkpointing: bool
    backend: str                      # auto | torch | deepspeed
    zero_stage: int


@dataclass(frozen=True)
class SFTSettings(TrainerSettings):
    SECTION: ClassVar[str] = "sft"


@dataclass(frozen=True)
class RMSettings(TrainerSettings):
    SECTION: ClassVar[str] = "rm"
    eval_fraction: float              # share of the prompts held out for the accuracy against the gold
    batch_size_scoring: int           # also the batch of every later stage that scores with the proxy


@dataclass(frozen=True)
class DPOSettings(TrainerSettings):
    """One DPO-family method's settings: the dpo section with the method's TR-DPO fields (rlhf/stages/dpo.py)."""
    SECTION: ClassVar[str] = "dpo"
    beta: float
    sync_alpha: float | None          # TR-DPO's alpha; None: plain DPO
    sync_steps: int                   # TR-DPO's tau (updates)

    @classmethod
    def for_method(cls, cfg: dict, method: str) -> "DPOSettings":
        """The dpo section with `method`'s fields (the stage's own view holds it resolved: DPOSettings.of)."""
        section = {k: v for k, v in cfg["dpo"].items() if k != "methods"}
        return cls(**section, **cfg["dpo"]["methods"][method])


@dataclass(frozen=True)
class SampleSettings(Section):
    SECTION: ClassVar[str] = "sample"
    num_prompts: int | None           # None: all train prompts
    pairs_per_prompt: int
    temperature: float
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class EvaluateSettings(Section):
    SECTION: ClassVar[str] = "evaluate"
    num_prompts: int | None           # None: all test prompts
    temperature: float
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class CertifySettings(Section):
    SECTION: ClassVar[str] = "certify"
    num_prompts: int
    group_size: int
    temperature: float
    max_new_tokens: int
    noise_samples: int
    model_noise: float                # relative std of the whole-model noise
    embedding_noise: float            # relative std of the input-embedding noise
    min_group_std: float
    bins: int


@dataclass(frozen=True)
class MechanismSettings(Section):
    SECTION: ClassVar[str] = "mechanisms"
    method: str | None                # the diagnosed method's runs (None: off)
    proxy_quantile: float             # exploit: proxy reward above this quantile of the SFT policy's completions'
    gold_quantile: float              # ... and gold reward below this quantile of theirs


@dataclass(frozen=True)
class RLVRSettings(Section):
    """An RLVR experiment's reward and prompts (the section is present only in RLVR configs)."""
    SECTION: ClassVar[str] = "rlvr"
    reward: str                       # rule | judge
    system_prompt: str | None         # GSM8K-format system message (None: ReDit's)
    one_shot: bool                    # ReDit's one-shot turn in GSM8K-format prompts
    math_verify_timeout: float
    math_verify_workers: int
    judge: dict                       # reply_format, correctness_map, unparseable_reward, one_shot, standin

    def judge_reward(self):
        """The judge reward's settings (rlhf/rewards/llm_judge.py)."""
        j = self.judge
        return JudgeRewardSettings(reply_format=j["reply_format"], correctness_map=tuple(j["correctness_map"]),
                                   unparseable_reward=j["unparseable_reward"], one_shot=j["one_shot"])


@dataclass(frozen=True)
class ModelSettings(Section):
    """The policy: a hub id or folder (name) or the miniature's tiny model (build), and how every stage loads it."""
    SECTION: ClassVar[str] = "model"
    dtype: str                        # float32 | bfloat16 | float16: weights of every model a stage loads
    pad_token: str | None             # for a tokenizer without one (e.g. '<|padding|>' for Pythia)
    name: str | None = None           # a hub id or folder
    build: dict | None = None         # the tiny model's shape (rlhf/models.py: build_tiny_causal_lm)


@dataclass(frozen=True)
class AdvPOSettings(Section):
    SECTION: ClassVar[str] = "advpo"
    ridge: float                      # lambda_r of M_D = lambda_r I + sum of phi phi^T


@dataclass(frozen=True)
class BSPOSettings(Section):
    """BSPO's ScoreLM (reward bspo)."""
    SECTION: ClassVar[str] = "bspo"
    alpha: float                      # weight of the behavior loss beside Bradley-Terry
    behavior_tokens: str              # completion | sequence: the tokens the behavior loss is over


SECTIONS = (SFTSettings, RMSettings, SampleSettings, EvaluateSettings, CertifySettings, ModelSettings, AdvPOSettings,
            BSPOSettings)


@dataclass(frozen=True)
class GRPOSettings(Section):
    SECTION: ClassVar[str] = "grpo"   # of(cfg): the section itself; for_method(cfg, m): with m's overrides
    # schedule and batch
    steps: int = neutral()
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
    skip_zero_advantage: bool = neutral()  # exact: no backward for micro-batches of zero gradient (trainer)
    backend: str                      # auto | torch | deepspeed
    zero_stage: int
    # KL penalty, Reference Resets, scheduled-beta ablation, Elastic Reset
    kl_beta: float
    reset_every: int
    kl_beta_decay_every: int
    elastic_reset_every: int          # Elastic Reset (rlhf/algorithms/resets.py): 0 = off
    elastic_reset_decay: float
    # gradient regularization (rlhf/algorithms/gr.py)
    gr_gamma: float
    gr_estimator: str                 # finite_difference | hvp
    gr_eps: float
    gr_g1_clip: float
    gr_g2_clip: float
    gr_excluded_grad: str             # g1 | g2 | g2_raw
    gr_second_pass_ratio: str         # one | stored
    gr_refresh_master_weights: bool
    # the reward GRPO trains on: a kind of rlhf/rewards/kinds.py, whose own settings follow (each None unless used)
    reward: str                       # proxy | uwo | advpo | bspo | verifiable | a registered kind
    # AdvPO (rlhf/algorithms/advpo.py): the proxy's features times the adversarial head
    advpo_budget: float | None        # reward advpo's budget B
    # BSPO (rlhf/algorithms/bspo.py): the ScoreLM's reward, r_min outside the behavior support
    bspo_threshold: float | None      # reward bspo's support threshold
    bspo_r_min: float | None          # None: the ScoreLM's lowest reward on its training completions
    # UWO (rlhf/algorithms/ensemble.py): the reward over the ensemble section's members
    uwo_lambda: float | None          # reward uwo's lambda
    uwo_penalty: str                  # var | std
    # SignCert-PO (rlhf/algorithms/signcert.py)
    signcert_quantile: float | None   # None: off
    signcert_epsilon_from: str        # radius | inverse_radius
    signcert_quantile_over: str       # nonzero | all
    signcert_clip_negative: bool
    # diagnostics and evaluation beside training
    sharpness_every: int = neutral()
    sharpness_perturbations: int = neutral()
    sharpness_radius: float = neutral()
    sharpness_prompts: int = neutral()
    kl_metric_every: int = neutral()
    eval_every: int = neutral()
    eval_prompts: int = neutral()
    eval_train_prompts: int = neutral()
    rollouts_every: int = neutral()
    checkpoint_every: int = neutral()
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


TRAJECTORY_NEUTRAL = frozenset(f.name for f in dataclasses.fields(GRPOSettings) if f.metadata.get("trajectory_neutral"))
