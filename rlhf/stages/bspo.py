"""bspo: BSPO's ScoreLM (Dai et al. 2025; rlhf/algorithms/bspo.py), once per experiment.

The proxy RM's recipe (the rm section's trainer settings, the same labeled pairs and held-out split, TRL's
RewardTrainer) with the SFT policy's LM head kept and the behavior loss added: -log sigmoid(dr) - alpha * log beta over
the completions' tokens. Its output is one model folder that loads as the reward model (score head) and as the causal
LM beta (LM head); metrics.json adds what GRPO's support test needs: r_min_train (the lowest reward over the training
completions, grpo.bspo_r_min's default) and, per candidate threshold, the fraction of held-out completions (the SFT
policy's own samples, labeled but never trained on) that the test would put outside the support.
"""
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.algorithms.bspo import scorelm_loss
from rlhf.distributed import Dist, shared_atomic_dir
from rlhf.models import (attach_behavior_head, behavior_token_logprobs, encode_prompt, load_reward_model,
                         rm_input_ids, tokenizer_of)
from rlhf.rewards.proxy_rm import BSPOScorer, RewardScorer
from rlhf.settings import BSPOSettings, RMSettings
from rlhf.stages.common import (TRAINER_WEIGHTS, heldout_accuracy, hf_trainer_kwargs, release_trainer, save_trained,
                                setup, training_pairs)

CALIBRATION_THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8)


class CompletionCollator(DataCollatorForPreference):
    """TRL's pair collator (chosen rows, then rejected rows, right-padded) plus completion_mask: the positions from
    each row's `*_start` on (its completion, EOS included; 0 for the whole sequence), whose log beta the behavior loss
    raises."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        starts = [e["chosen_start"] for e in examples] + [e["rejected_start"] for e in examples]
        positions = torch.arange(out["input_ids"].shape[1])
        out["completion_mask"] = (positions >= torch.tensor(starts)[:, None]) & out["attention_mask"].bool()
        return out


class ScoreLMTrainer(RewardTrainer):
    """RewardTrainer with BSPO's loss: one forward pass gives the reward (score head at the last token) and the
    last-layer states the LM head reads (hidden_states[-1] is the final-norm output, as the LM head sees it)."""

    def __init__(self, *args, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "chosen_start", "rejected_start"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        ids, completion = inputs["input_ids"], inputs["completion_mask"]
        outputs = model(input_ids=ids, attention_mask=inputs["attention_mask"], output_hidden_states=True,
                        use_cache=False)
        chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
        token_logprobs = behavior_token_logprobs(self.accelerator.unwrap_model(model), outputs.hidden_states[-1], ids,
                                                 completion[:, 1:])
        loss, behavior_nll = scorelm_loss(chosen, rejected, token_logprobs, self.alpha)
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["accuracy"].append(gather((chosen > rejected).float().mean()).mean().item())
            self._metrics[mode]["behavior_nll"].append(gather(behavior_nll.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


def run(cfg, files, args):
    dist = Dist.from_env(setup(cfg, args))
    r, sft = RMSettings.of(cfg), files.inputs["sft"]
    b = BSPOSettings.of(cfg)
    alpha, whole_sequence = b.alpha, b.behavior_tokens == "sequence"
    heldout, train = training_pairs(cfg, files.inputs["labels"])
    tokenizer = tokenizer_of(sft, cfg)
    model = load_reward_model(sft, tokenizer, TRAINER_WEIGHTS, dist.device)
    attach_behavior_head(model, sft)
    if not alpha and model.behavior_head_name is not None:
        getattr(model, model.behavior_head_name).requires_grad_(False)  # no behavior loss: nothing trains the head

    def row(x):
        start = 0 if whole_sequence else len(encode_prompt(tokenizer, x["prompt"]))
        return {"chosen_ids": rm_input_ids(tokenizer, x["prompt"], x["chosen"]), "chosen_start": start,
                "rejected_ids": rm_input_ids(tokenizer, x["prompt"], x["rejected"]), "rejected_start": start}

    with shared_atomic_dir(dist, files.outputs["model"]) as out:
        trainer = ScoreLMTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(
                                     [row(x) for x in train]),
                                 data_collator=CompletionCollator(pad_token_id=tokenizer.pad_token_id),
                                 args=RewardConfig(output_dir=str(out / "trainer"),
                                                   # the untied LM head is used outside the model's forward (on its
                                                   # last states): DDP's unused-parameter search would mark it ready
                                                   # in the forward and fail when its gradient arrives; every
                                                   # trainable parameter gets one each step, so no search is needed
                                                   ddp_find_unused_parameters=False,
                                                   **hf_trainer_kwargs(cfg, r, dist)), alpha=alpha)
        trainer.train()
        if dist.is_main:  # ZeRO-2 keeps the full weights on every rank; rank 0 scores and writes
            scorer = BSPOScorer(model.eval(), tokenizer, r.batch_size_scoring, threshold=0.0, r_min=0.0)
            proxy = RewardScorer(model, tokenizer, r.batch_size_scoring)  # the reward alone, no LM head
            train_rewards = proxy([x["prompt"] for x in train] * 2, [x["chosen"] for x in train]
                                  + [x["rejected"] for x in train]).rewards
            _, least = scorer.behavior([x["prompt"] for x in heldout] * 2, [x["chosen"] for x in heldout]
                                       + [x["rejected"] for x in heldout])
            metrics = {"n_train": len(train), "alpha": alpha, **heldout_accuracy(proxy, heldout),
                       "r_min_train": train_rewards.min().item(),
                       "heldout_least_logprob_median": least.median().item(),
                       "unsupported_heldout": {f"{t:g}": (least <= torch.log(torch.tensor(t))).float().mean().item()
                                               for t in CALIBRATION_THRESHOLDS}}
            save_trained(out, model, tokenizer, trainer, metrics, cfg, "bspo", {**r.as_dict(), **b.as_dict()})
            print("bspo: held-out completions outside the support per threshold: " + ", ".join(
                f"{t} {f:.1%}" for t, f in metrics["unsupported_heldout"].items()))
    release_trainer(trainer)
    dist.close()
