"""judge-cost: what an API judge (gold.type openai) will cost for this experiment, before paying for it.

Requests come from the config: pairs to label (sample.num_prompts x pairs_per_prompt), final win rates
((methods x seeds + the SFT baseline) x test prompts, x2 with both_orders) and the GRPO stage's periodic
evaluations (win rate and on-policy RM accuracy on eval_prompts every eval_every steps, and the win rate on
eval_train_prompts training prompts for early stopping). Tokens per request:
the judging template plus a prompt plus two completions, at ~4 characters per token (OpenAI's rule of thumb),
measured from this experiment's data and samples when they exist, else from --prompt-tokens and the
max_new_tokens upper bound. Output tokens are the judge's max_tokens (an upper bound for 'Output (a)').
"""
from __future__ import annotations

import math

from rlhf.errors import ConfigError
from rlhf.io import read_jsonl
from rlhf.judge import prompt as jp
from rlhf.judge.client import MESSAGE_OVERHEAD_TOKENS, model_price, usd
from rlhf.paths import Paths
from rlhf.settings import EvaluateSettings, GRPOSettings, SampleSettings

CHARS_PER_TOKEN = 4


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def estimate(cfg: dict, prompt_tokens: float | None = None, train_prompts: int | None = None) -> list[dict]:
    P, j = Paths.from_config(cfg), cfg["gold"]["judge"]
    price = model_price(j)
    template = sum(_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in jp.messages("", "", ""))
    notes = []
    train = read_jsonl(P.train) if P.train.is_file() else None
    if train is not None:
        prompt_tokens = _mean(_tokens(r["prompt"]) for r in train)
        notes.append(f"prompt tokens measured from {P.train}")
    elif prompt_tokens is None:
        raise ConfigError(f"{P.train} does not exist yet: pass --prompt-tokens (mean tokens of a prompt)")
    if P.samples.is_file():
        rows = read_jsonl(P.samples)
        sample_completion = _mean(_tokens(r["a"]) + _tokens(r["b"]) for r in rows) / 2
        pairs = len(rows)
        notes.append(f"pairs and completion tokens measured from {P.samples}")
    else:
        s = SampleSettings.of(cfg)
        available = len(train) if train is not None else (cfg["data"]["num_train"] or train_prompts)
        if available is None and s.num_prompts is None:
            raise ConfigError("sample.num_prompts and data.num_train are null (all prompts): pass --train-prompts "
                              "or run the data stage first")
        pairs = min(s.num_prompts or available, available or s.num_prompts) * s.pairs_per_prompt
        sample_completion = s.max_new_tokens
    runs = len(cfg["methods"]) * len(cfg["seeds"])
    e = EvaluateSettings.of(cfg)
    test = e.num_prompts or cfg["data"]["num_test"]
    if not test:
        raise ConfigError("evaluate.num_prompts and data.num_test are null: the number of test prompts is unknown")
    orders = 2 if j["both_orders"] else 1
    # Each method's own steps, eval_every, eval_prompts and max_new_tokens (a method may override any of them);
    # a periodic evaluation judges win rates (x orders) and on-policy RM accuracy pairs, and the training and
    # validation prompts' win rates.
    grpo_evals, validation = [], cfg["data"].get("num_validation", 0)
    for method in cfg["methods"]:
        m = GRPOSettings.for_method(cfg, method)
        evals = (math.ceil(m.steps / m.eval_every) + 1) * len(cfg["seeds"])
        grpo_evals.append((evals * (m.eval_prompts * (orders + 1) + (m.eval_train_prompts + validation) * orders),
                           m.max_new_tokens))
    rows = [("label", [(pairs, sample_completion)]),
            ("evaluate", [((runs + 1) * test * orders, e.max_new_tokens)]),
            ("grpo evals", grpo_evals)]
    out = []
    for what, parts in rows:
        requests = sum(n for n, _ in parts)
        tokens_in = sum(n * (template + prompt_tokens + 2 * completion) for n, completion in parts)
        tokens_out = requests * j["max_tokens"]
        cost = usd(price, tokens_in, tokens_out)
        out.append({"what": what, "requests": int(requests), "input_mtok": tokens_in / 1e6,
                    "output_mtok": tokens_out / 1e6, "usd": cost, "usd_batch": cost * j["batch_discount"]})
    out.append({"what": "total", **{k: sum(r[k] for r in out) for k in out[0] if k != "what"}})
    for note in notes:
        print(f"judge-cost: {note}")
    return out


def run(cfg, args):
    if cfg["gold"]["type"] != "openai":
        print(f"judge-cost: gold.type is {cfg['gold']['type']!r}; only 'openai' costs money")
        return
    rows = estimate(cfg, args.prompt_tokens, args.train_prompts)
    j = cfg["gold"]["judge"]
    print(f"judge-cost: {cfg['experiment']} with {j['model']} (${j['prices'][j['model']]['input']}/"
          f"${j['prices'][j['model']]['output']} per 1M input/output tokens), budget_usd {j['budget_usd']}")
    print(f"{'':12}{'requests':>11}{'input Mtok':>12}{'output Mtok':>13}{'USD':>10}{'USD batch':>11}")
    for r in rows:
        print(f"{r['what']:12}{r['requests']:>11,}{r['input_mtok']:>12.2f}{r['output_mtok']:>13.3f}"
              f"{r['usd']:>10.2f}{r['usd_batch']:>11.2f}")
