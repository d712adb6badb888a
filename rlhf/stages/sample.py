"""sample: pairs of completions per prompt from the SFT policy (temperature 1.0 in the papers)."""
from rlhf.generation import sample
from rlhf.io import read_jsonl, write_jsonl
from rlhf.models import load_causal_lm, tokenizer_of
from rlhf.settings import ModelSettings, SampleSettings
from rlhf.stages.common import setup


def run(cfg, files, args):
    device = setup(cfg, args)
    s, sft, out = SampleSettings.of(cfg), files.inputs["sft"], files.outputs["samples"]
    rows = read_jsonl(files.inputs["train"], required=("prompt",))[: s.num_prompts]
    tokenizer = tokenizer_of(sft, cfg)
    policy = load_causal_lm(sft, ModelSettings.of(cfg).dtype, device)
    prompts = [r["prompt"] for r in rows]
    k = 2 * s.pairs_per_prompt
    rollout = sample(policy, tokenizer, prompts, k, s.max_new_tokens, s.temperature, s.batch_size)
    pairs, identical = [], 0
    for i, prompt in enumerate(prompts):
        texts = rollout.texts[i * k:(i + 1) * k]
        for a, b in zip(texts[0::2], texts[1::2]):
            if a == b:  # carries no preference information and would cost a paid label
                identical += 1
                continue
            pairs.append({"prompt": prompt, "a": a, "b": b, "prompt_index": i})
    write_jsonl(out, pairs)
    print(f"sample: {len(pairs)} pairs from {len(prompts)} prompts ({identical} identical pairs dropped) -> {out}")
