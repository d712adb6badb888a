"""sft: supervised fine-tuning on the references with a completion-only loss (TRL SFTTrainer).

The data is tokenized here by the same functions the RM and GRPO use (prompt ids + completion ids + EOS),
so the three stages agree on where a completion starts and that it ends with EOS.
"""
import shutil

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf.distributed import Dist, shared_atomic_dir
from rlhf.io import read_jsonl
from rlhf.metrics_log import write_trainer_log
from rlhf.models import encode_completion, encode_prompt, load_causal_lm, load_tokenizer
from rlhf.settings import ModelSettings, SFTSettings
from rlhf.stages.common import TRAINER_WEIGHTS, hf_trainer_kwargs, release_trainer, setup, trainer_engine


def tokenize(tokenizer, rows: list[dict]) -> Dataset:
    def encode(row):
        prompt = encode_prompt(tokenizer, row["prompt"])
        completion = encode_completion(tokenizer, row["reference"]) + [tokenizer.eos_token_id]
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
    return Dataset.from_list([encode(r) for r in rows])


def train(cfg, settings: SFTSettings, dist: Dist, model, tokenizer, rows: list[dict], out) -> tuple[list[dict], str]:
    """TRL's SFTTrainer on the references; returns its log history and the engine it ran on."""
    args = SFTConfig(output_dir=str(out / "trainer"), completion_only_loss=True,
                     **hf_trainer_kwargs(cfg, settings, dist))
    trainer = SFTTrainer(model=model, args=args, train_dataset=tokenize(tokenizer, rows), processing_class=tokenizer)
    trainer.train()
    result = trainer.state.log_history, trainer_engine(trainer)
    release_trainer(trainer)
    return result


def run(cfg, files, args):
    """sft.epochs 0 keeps the base model as it is (an instruct model as the RLVR papers' starting policy)."""
    dist = Dist.from_env(setup(cfg, args))  # under torchrun the Trainer runs data parallel over the ranks
    device, settings = dist.device, SFTSettings.of(cfg)
    rows = read_jsonl(files.inputs["train"], required=("prompt", "reference"))
    base = str(files.inputs.get("base") or ModelSettings.of(cfg).name)  # the base stage's tiny model, or a hub id / folder
    folder = files.outputs["model"]
    tokenizer = load_tokenizer(base, pad_token=ModelSettings.of(cfg).pad_token)
    model = load_causal_lm(base, TRAINER_WEIGHTS, device)
    model.config.pad_token_id = tokenizer.pad_token_id
    with shared_atomic_dir(dist, folder) as out:
        log, engine = train(cfg, settings, dist, model, tokenizer, rows, out) if settings.epochs else ([], "none")
        if dist.is_main:  # ZeRO-2 keeps the full weights on every rank; rank 0 writes them
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            write_trainer_log(out / "train_log.jsonl", log, cfg, "sft", settings.as_dict())
            shutil.rmtree(out / "trainer", ignore_errors=True)
            print(f"sft: {len(log) and log[-1].get('step', 0)} steps ({engine}) -> {folder}")
    dist.close()
