"""base (miniatures only): a tokenizer over the task's closed vocabulary and a tiny causal LM, saved as a plain HF
folder. The RLHF miniature's is word-level; the RLVR miniature's (data.arithmetic) keeps whitespace exact and has a
chat template (rlhf/data/arithmetic.py).

Paper-scale configs name a hub model instead (model.name) and skip this stage; nothing downstream changes.
"""
from rlhf.data import miniature_tokenizer
from rlhf.errors import ConfigError
from rlhf.io import atomic_dir
from rlhf.models import build_tiny_causal_lm, load_tokenizer
from rlhf.stages.common import setup


def run(cfg, files, args):
    if "build" not in cfg["model"]:
        raise ConfigError("the base stage builds a tiny model from model.build; this config names model.name instead")
    setup(cfg, args, device=False)  # built on the CPU, wherever it later runs
    tokenizer = miniature_tokenizer(cfg)
    model = build_tiny_causal_lm(cfg["model"]["build"], tokenizer, cfg["seed"])
    folder = files.outputs["model"]
    with atomic_dir(folder) as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        load_tokenizer(out)  # the saved folder must load back through the project's loader and encode text
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {type(model).__name__} with {n / 1e6:.2f}M parameters, vocabulary {len(tokenizer)} -> {folder}")
