"""Where every artifact lives: one place, used by the stages and by the Snakefile."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_config(cls, cfg: dict) -> "Paths":
        return cls(Path(cfg["results_dir"]) / cfg["experiment"])

    # stage outputs; models are plain Hugging Face folders
    @property
    def data(self) -> Path: return self.root / "data"
    @property
    def train(self) -> Path: return self.data / "train.jsonl"
    @property
    def test(self) -> Path: return self.data / "test.jsonl"
    @property
    def validation(self) -> Path: return self.data / "validation.jsonl"  # only with data.num_validation
    @property
    def base(self) -> Path: return self.root / "base"
    @property
    def sft(self) -> Path: return self.root / "sft"
    @property
    def samples(self) -> Path: return self.root / "pairs" / "samples.jsonl"
    @property
    def labels(self) -> Path: return self.root / "pairs" / "labels.jsonl"
    @property
    def rm(self) -> Path: return self.root / "rm"
    @property
    def certify(self) -> Path: return self.root / "certify"
    @property
    def mechanisms(self) -> Path: return self.root / "mechanisms"  # each method's signal on a run's rollouts
    @property
    def report(self) -> Path: return self.root / "report"
    @property
    def judge_cache(self) -> Path: return self.root / "judge_cache"  # every paid API answer: one shard per process
    @property
    def wandb(self) -> Path: return self.root / "wandb"  # offline runs, synced later with `wandb sync`

    @property
    def advpo(self) -> Path: return self.root / "advpo" / "precision.pt"  # AdvPO's M_D^-1 from the proxy's features

    @property
    def bspo(self) -> Path: return self.root / "bspo" / "rm"  # BSPO's ScoreLM: the reward model with its LM head

    def rm_member(self, k) -> Path:
        return self.root / "rm_ensemble" / f"member{k}"  # UWO's ensemble (ensemble section), k = 1..members

    def grpo(self, method: str, seed) -> Path:
        return self.root / "grpo" / str(method) / f"seed{seed}"

    def policy(self, method: str, seed) -> Path:
        return self.grpo(method, seed) / "policy"

    def grpo_work(self, method: str, seed) -> Path:
        return self.grpo(method, seed) / "work"  # checkpoint and the live metrics log while the run is in progress

    def grpo_metrics(self, method: str, seed) -> Path:
        return self.grpo(method, seed) / "metrics.jsonl"

    def grpo_rollouts(self, method: str, seed) -> Path:
        return self.grpo(method, seed) / "rollouts.jsonl"  # grpo.rollouts_every: what the policy wrote, every k steps

    def grpo_heldout(self, method: str, seed) -> Path:
        return self.grpo(method, seed) / "heldout.jsonl"  # RLVR: each held-out question's correctness at each eval step

    def dpo_policy(self, method: str, seed) -> Path:
        return self.root / "dpo" / str(method) / f"seed{seed}" / "policy"  # with its trainer log, train_log.jsonl

    def evaluation(self, method: str, seed) -> Path:
        return self.root / "eval" / str(method) / f"seed{seed}"

    def logs(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"
