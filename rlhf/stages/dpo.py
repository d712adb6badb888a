"""dpo: the DPO-family baselines of GR Table 1 — DPO (Rafailov et al. 2023) and TR-DPO (Gorbatovski et al. 2024) —
trained by TRL's DPOTrainer on the labeled preference pairs from the SFT policy, one policy per method and seed.

TR-DPO is TRL's reference sync (`sync_ref_model`): after every `sync_steps` updates pi_ref <- alpha * pi_theta +
(1 - alpha) * pi_ref (alpha 1: a hard reset, the DPO analogue of Reference Resets). The pairs are those the proxy RM
is trained on (all labeled pairs; the RM only holds some out to measure itself), completions in the stored form the
other stages use (a space, the stripped text, EOS), so the policy sees what SFT, RM and GRPO see. Output: a policy
folder like GRPO's, evaluated and reported the same way, with the trainer's log (train_log.jsonl).
"""
import shutil

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rlhf.distributed import Dist, shared_atomic_dir
from rlhf.io import read_jsonl
from rlhf.metrics_log import write_trainer_log
from rlhf.models import load_causal_lm, tokenizer_of
from rlhf.settings import DPOSettings
from rlhf.stages.common import TRAINER_WEIGHTS, hf_trainer_kwargs, release_trainer, setup, trainer_engine


def pairs(rows: list[dict]) -> Dataset:
    """TRL's preference format; TRL appends EOS and splits prompt from completion where their tokens diverge."""
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": " " + r["chosen"].strip(),
                               "rejected": " " + r["rejected"].strip()} for r in rows])


def dpo_config(cfg: dict, s: DPOSettings, dist: Dist, seed: int, output_dir: str) -> DPOConfig:
    tr_dpo = s.sync_alpha is not None
    return DPOConfig(output_dir=output_dir, beta=s.beta, sync_ref_model=tr_dpo,
                     **({"ref_model_mixup_alpha": s.sync_alpha, "ref_model_sync_steps": s.sync_steps} if tr_dpo else {}),
                     **{**hf_trainer_kwargs(cfg, s, dist), "seed": seed})


def run(cfg, files, args):
    method, seed = args.method, args.seed
    dist = Dist.from_env(setup(cfg, args, seed=seed))
    s, sft = DPOSettings.of(cfg), files.inputs["sft"]
    rows = read_jsonl(files.inputs["labels"], required=("prompt", "chosen", "rejected"))
    tokenizer = tokenizer_of(sft, cfg)
    model = load_causal_lm(sft, TRAINER_WEIGHTS, dist.device)
    folder = files.outputs["policy"]
    with shared_atomic_dir(dist, folder) as out:
        trainer = DPOTrainer(model=model, args=dpo_config(cfg, s, dist, seed, str(out / "trainer")),
                             train_dataset=pairs(rows), processing_class=tokenizer)
        trainer.train()
        if dist.is_main:  # ZeRO-2 keeps the full weights on every rank; rank 0 writes them
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            write_trainer_log(out / "train_log.jsonl", trainer.state.log_history, cfg, f"dpo-{method}-seed{seed}",
                              s.as_dict())
            shutil.rmtree(out / "trainer", ignore_errors=True)
            print(f"dpo: {method} seed {seed}: {trainer.state.global_step} updates ({trainer_engine(trainer)}) "
                  f"-> {folder}")
    release_trainer(trainer)
    dist.close()
