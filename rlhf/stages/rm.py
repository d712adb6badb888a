"""rm: the proxy reward model, SFT weights + a fresh scalar head, Bradley-Terry loss (TRL RewardTrainer).

Held-out accuracy is reported against the gold labels and, where the gold has scores, against the
noise-free gold order (the quantity that tells how exploitable the proxy is).
"""
import shutil

import numpy as np
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from rlhf.errors import DataError
from rlhf.distributed import Dist, shared_atomic_dir
from rlhf.io import read_jsonl, write_json
from rlhf.metrics_log import write_trainer_log
from rlhf.models import load_reward_model, rm_input_ids
from rlhf.rewards.proxy_rm import RewardScorer, split_by_prompt
from rlhf.settings import RMSettings
from rlhf.stages.common import TRAINER_WEIGHTS, hf_trainer_kwargs, setup, tokenizer_of, trainer_engine
from rlhf.stats import preference_metrics


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


def training_pairs(cfg: dict, labels) -> tuple[list[dict], list[dict]]:
    """(held out, train): the labeled pairs split by prompt, the same split for the proxy, UWO's members and BSPO."""
    rows = read_jsonl(labels, required=("prompt", "chosen", "rejected"))
    eval_fraction = cfg["rm"]["eval_fraction"]
    heldout, train = split_by_prompt(rows, eval_fraction, cfg["seed"])
    if not train:
        raise DataError(f"{labels}: {len(rows)} labeled pairs leave nothing to train on after holding out "
                        f"{len(heldout)} (rm.eval_fraction = {eval_fraction})")
    return heldout, train


def save_trained(out, model, tokenizer, trainer, metrics: dict, cfg: dict, job: str, settings: dict) -> None:
    """Rank 0 after training: the model folder, its metrics.json and the trainer's log; one summary line."""
    shutil.rmtree(out / "trainer", ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "metrics.json", metrics)
    write_trainer_log(out / "train_log.jsonl", trainer.state.log_history, cfg, job, settings, summary=metrics)
    print(f"{job} ({trainer_engine(trainer)}): " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict)))


def run(cfg, files, args):
    """The proxy RM, or (rule rm_member, --member k) member k of UWO's ensemble: seed + k, the same pairs and held-out
    split, from the SFT policy or ensemble.model."""
    member = getattr(args, "member", None)
    seed = cfg["seed"] + (member or 0)
    dist = Dist.from_env(setup(cfg, args, seed=seed))  # under torchrun the Trainer runs data parallel over the ranks
    device = dist.device
    r = RMSettings.of(cfg)
    sft = files.inputs.get("sft") or cfg["ensemble"]["model"]  # a member may start from another (smaller) model
    heldout, train = training_pairs(cfg, files.inputs["labels"])
    tokenizer = tokenizer_of(sft, cfg)
    model = load_reward_model(sft, tokenizer, TRAINER_WEIGHTS, device)
    dataset = Dataset.from_list([{"chosen_ids": rm_input_ids(tokenizer, x["prompt"], x["chosen"]),
                                  "rejected_ids": rm_input_ids(tokenizer, x["prompt"], x["rejected"])} for x in train])
    with shared_atomic_dir(dist, files.outputs["model"]) as out:
        trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                                args=RewardConfig(output_dir=str(out / "trainer"), weight_decay=r.weight_decay,
                                                  **{**hf_trainer_kwargs(cfg, r, dist), "seed": seed}))
        trainer.train()
        if dist.is_main:  # ZeRO-2 keeps the full weights on every rank; rank 0 scores and writes
            metrics = {"n_train": len(train),
                       **heldout_accuracy(RewardScorer(model, tokenizer, r.batch_size_scoring), heldout)}
            save_trained(out, model, tokenizer, trainer, metrics, cfg, "rm" if member is None else f"rm-member{member}",
                         r.as_dict())
    dist.close()
