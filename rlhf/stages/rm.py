"""rm: the proxy reward model, SFT weights + a fresh scalar head, Bradley-Terry loss (TRL RewardTrainer).

Held-out accuracy is reported against the gold labels and, where the gold has scores, against the
noise-free gold order (the quantity that tells how exploitable the proxy is).
"""
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from rlhf.distributed import Dist, shared_atomic_dir
from rlhf.models import load_reward_model, rm_input_ids, tokenizer_of
from rlhf.rewards.proxy_rm import RewardScorer
from rlhf.settings import RMSettings
from rlhf.stages.common import (TRAINER_WEIGHTS, heldout_accuracy, hf_trainer_kwargs, release_trainer, save_trained,
                                setup, training_pairs)


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
                                args=RewardConfig(output_dir=str(out / "trainer"),
                                                  **{**hf_trainer_kwargs(cfg, r, dist), "seed": seed}))
        trainer.train()
        if dist.is_main:  # ZeRO-2 keeps the full weights on every rank; rank 0 scores and writes
            metrics = {"n_train": len(train),
                       **heldout_accuracy(RewardScorer(model, tokenizer, r.batch_size_scoring), heldout)}
            save_trained(out, model, tokenizer, trainer, metrics, cfg, "rm" if member is None else f"rm-member{member}",
                         r.as_dict())
    release_trainer(trainer)
    dist.close()
