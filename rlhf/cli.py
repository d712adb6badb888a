"""`python -m rlhf <stage> --config FILE [key.sub=value ...]`: one command per pipeline stage."""
from __future__ import annotations

import argparse
import importlib
import sys

from rlhf.errors import RLHFError

STAGES = {
    "data": "prompts with references, train/test splits",
    "base": "build the miniature's tokenizer and tiny causal LM (miniature only)",
    "sft": "supervised fine-tuning on references (completion-only loss)",
    "sample": "pairs of completions per prompt from the SFT policy",
    "label": "gold preference for each pair",
    "rm": "proxy reward model (Bradley-Terry) and its held-out accuracy",
    "grpo": "Dr.GRPO against the proxy RM for one method and seed",
    "evaluate": "gold win rate against references for one method and seed (or 'sft')",
    "certify": "certified-radius validation of the proxy RM (SignCert Fig. 4)",
    "report": "table and plots over methods x seeds",
    "bench": "seconds per GRPO step: noreg, gr, signcert and TRL's GRPOTrainer as Dr.GRPO",
    "judge-cost": "expected requests, tokens and USD of an API judge (gold.type openai) for this experiment",
}
PER_RUN = {"grpo", "evaluate"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf", description=__doc__)
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_ in STAGES.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", required=True, help="experiment YAML (validated against workflow/schemas/config.schema.yaml)")
        s.add_argument("--threads", type=int, help="torch CPU threads (default: resources.threads)")
        if name in PER_RUN:
            s.add_argument("--method", required=True, help="a key of config.methods" + (" or 'sft'" if name == "evaluate" else ""))
            s.add_argument("--seed", type=int, required=True, help="policy-optimization seed")
        if name == "bench":
            s.add_argument("--warmup", type=int, default=3, help="untimed steps first")
            s.add_argument("--timed", type=int, default=20, help="timed steps (mean reported)")
            s.add_argument("--no-vllm", action="store_true", help="skip the HF vs vLLM sampling comparison")
        if name == "judge-cost":
            s.add_argument("--prompt-tokens", type=float, help="mean tokens of a prompt, when the data stage has not run")
            s.add_argument("--train-prompts", type=int, help="train prompts available, when the data stage has not run")
        s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. grpo.lr=1e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rlhf.config import load_config
    try:
        cfg = load_config(args.config, args.overrides)
        importlib.import_module(f"rlhf.stages.{args.stage.replace('-', '_')}").run(cfg, args)
    except RLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
