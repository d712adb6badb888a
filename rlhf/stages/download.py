"""download: fetch what an experiment reads from the Hugging Face hub into the local hub cache, once, before a cluster
run; the jobs then run offline and no job, and no rank of a job, reaches for the hub.

    python -m rlhf download --config config/paper/gr-tldr-pythia-1b.yaml      # on a machine with the hub
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1                           # every job inherits it (sbatch --export)
    snakemake --profile profiles/slurm --configfile config/paper/gr-tldr-pythia-1b.yaml

Models: model.name, ensemble.model and a reward-model gold's gold.name, their config, tokenizer and safetensors files
(`huggingface_hub.snapshot_download`). The dataset: the data stage's own loaders run once (rlhf.data.load_splits), so
exactly the files and the datasets cache they read are there. Local folders are skipped. The cache is
$HF_HOME (default ~/.cache/huggingface): on a cluster, a folder every node mounts.
"""
from __future__ import annotations

from pathlib import Path

from rlhf.data import load_splits
from rlhf.errors import DataError

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # not the .bin / .pth twins


def hub_models(cfg: dict) -> list[str]:
    """The hub model ids the experiment loads (local folders left out)."""
    names = [cfg["model"].get("name"), (cfg.get("ensemble") or {}).get("model"),
             cfg["gold"].get("name") if cfg["gold"]["type"] == "reward_model" else None]
    return [n for n in dict.fromkeys(names) if n and not Path(n).exists()]


def run(cfg, args):
    from huggingface_hub import snapshot_download  # this tool's own need: the stages read the cache offline
    for name in hub_models(cfg):
        try:
            folder = snapshot_download(name, allow_patterns=MODEL_FILES)
        except Exception as e:  # no network, no such repository, a gated model without a token: one line
            raise DataError(f"download: model {name}: {type(e).__name__}: {e}") from None
        print(f"download: model {name} -> {folder}")
    if cfg["data"]["source"] not in ("miniature", "arithmetic", "jsonl"):
        train, test = load_splits(cfg)
        print(f"download: dataset {cfg['data']['hub_name']}: {len(train)} train / {len(test)} test rows cached")
    print("download: done; run the experiment with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 in the environment")
