"""evaluate: win rate of a policy against the references on the test prompts, judged by the gold (95% CI),
with mean gold and proxy reward, KL to the SFT policy and length. `--method sft` evaluates the SFT policy.
RLVR: accuracy by the rule checker (95% CI) and the training reward's mean on the test questions."""
from rlhf.data.rlvr import rlvr_task
from rlhf.evaluation import evaluate_policy, evaluate_rlvr
from rlhf.io import atomic_dir, read_jsonl, write_json, write_jsonl
from rlhf.models import load_causal_lm, tokenizer_of
from rlhf.rewards.gold import make_gold
from rlhf.settings import EvaluateSettings, ModelSettings
from rlhf.rewards.proxy_rm import load_proxy
from rlhf.rewards.verifiable import verifiable_reward
from rlhf.stages.common import setup


def run(cfg, files, args):
    method, seed = args.method, args.seed
    device = setup(cfg, args, seed=seed)
    e, inputs, folder = EvaluateSettings.of(cfg), files.inputs, files.outputs["evaluation"]
    rows = read_jsonl(inputs["test"], required=("prompt", "reference"))[: e.num_prompts]
    if rlvr_task(cfg):
        return run_rlvr(cfg, files, args, e, rows, device)
    tokenizer = tokenizer_of(inputs["sft"], cfg)
    dtype = ModelSettings.of(cfg).dtype
    sft = load_causal_lm(inputs["sft"], dtype, device)
    policy = sft if inputs["policy"] == inputs["sft"] else load_causal_lm(inputs["policy"], dtype, device)
    proxy = load_proxy(inputs["rm"], cfg, tokenizer, device)
    metrics, completions = evaluate_policy(policy, tokenizer, rows, make_gold(cfg, device), proxy, sft,
                                           temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                                           batch_size=e.batch_size)
    with atomic_dir(folder) as out:
        write_json(out / "metrics.json", {"method": method, "seed": seed, **metrics})
        write_jsonl(out / "completions.jsonl", completions)
    print(f"evaluate: {method} seed {seed}: win rate {metrics['win_rate']:.3f} "
          f"[{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] -> {folder}")


def run_rlvr(cfg, files, args, e, rows, device):
    method, seed, inputs, folder = args.method, args.seed, files.inputs, files.outputs["evaluation"]
    tokenizer = tokenizer_of(inputs["sft"], cfg)
    policy = load_causal_lm(inputs["policy"], ModelSettings.of(cfg).dtype, device)
    with verifiable_reward(cfg, rows) as reward:  # its stand-in judge, if any, served while the block lasts
        metrics, completions = evaluate_rlvr(policy, tokenizer, rows, rlvr_task(cfg), reward, reward.verifier,
                                             temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                                             batch_size=e.batch_size)
    with atomic_dir(folder) as out:
        write_json(out / "metrics.json", {"method": method, "seed": seed, **metrics})
        write_jsonl(out / "completions.jsonl", completions)
    print(f"evaluate: {method} seed {seed}: accuracy {metrics['accuracy']:.3f} "
          f"[{metrics['accuracy_ci_low']:.3f}, {metrics['accuracy_ci_high']:.3f}], reward {metrics['reward']:.3f} "
          f"-> {folder}")
