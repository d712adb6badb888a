"""evaluate: win rate of a policy against the references on the test prompts, judged by the gold (95% CI),
with mean gold and proxy reward, KL to the SFT policy and length. `--method sft` evaluates the SFT policy."""
from rlhf.config import grpo_settings
from rlhf.evaluation import evaluate_policy
from rlhf.io import atomic_dir, read_jsonl, write_json, write_jsonl
from rlhf.models import load_causal_lm
from rlhf.paths import Paths
from rlhf.rewards.gold import make_gold
from rlhf.stages.common import load_proxy, setup, sft_tokenizer

SFT = "sft"


def run(cfg, args):
    method, seed = args.method, args.seed
    device = setup(cfg, args, seed=seed)
    e, P = cfg["evaluate"], Paths.from_config(cfg)
    if method != SFT:
        grpo_settings(cfg, method)  # fails clearly on an unknown method
    rows = read_jsonl(P.test, required=("prompt", "reference"))[: e["num_prompts"]]
    tokenizer = sft_tokenizer(cfg)
    dtype = cfg["model"]["dtype"]
    sft = load_causal_lm(P.sft, dtype, device)
    policy = sft if method == SFT else load_causal_lm(P.policy(method, seed), dtype, device)
    proxy = load_proxy(cfg, tokenizer, device)
    metrics, completions = evaluate_policy(policy, tokenizer, rows, make_gold(cfg, device), proxy, sft,
                                           temperature=e["temperature"], max_new_tokens=e["max_new_tokens"],
                                           batch_size=e["batch_size"])
    with atomic_dir(P.evaluation(method, seed)) as out:
        write_json(out / "metrics.json", {"method": method, "seed": seed, **metrics})
        write_jsonl(out / "completions.jsonl", completions)
    print(f"evaluate: {method} seed {seed}: win rate {metrics['win_rate']:.3f} "
          f"[{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] -> {P.evaluation(method, seed)}")
