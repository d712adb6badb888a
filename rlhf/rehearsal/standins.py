"""Stand-ins for the hub models of the paper configs: the same architecture class and tokenizer behaviour, tiny, and
briefly trained on the rehearsal's dataset folders so that what the pipeline samples from them is not noise.

  EleutherAI/pythia-*             GPTNeoXForCausalLM with an untied output head (Pythia's `embed_out`), byte-level BPE
                                  loaded as GPTNeoXTokenizer (`<|endoftext|>` as BOS/EOS, no pad token of its own)
  Qwen/Qwen2.5-*                  Qwen2ForCausalLM, tied embeddings, grouped-query attention; Qwen2Tokenizer (its regex
                                  pre-tokenizer and NFC, which transformers imposes on load), Qwen's chat template;
                                  base models end with `<|endoftext|>`, instruct models with `<|im_end|>`
  Skywork/Skywork-Reward-Llama-*  LlamaForSequenceClassification (one logit), a Llama-3-style tokenizer
                                  (PreTrainedTokenizerFast adding `<|begin_of_text|>`, `<|eot_id|>`, a `[PAD]` token)
                                  and chat template
  the LLM judges (GPT-4.1-nano,   a Qwen2 instruct model served by `vllm serve` under the judge's own model name,
  Qwen2.5-1.5B-Instruct)          trained to answer the pairwise prompt with "Output (a)"/"Output (b)" and the RLVR
                                  prompt (GR App. C.5) with the XML scores

Training is a few hundred AdamW steps on (prompt, reference) texts of the folders (hub_fixtures.py), the loss on the
completion and its EOS only; the gold RM is trained Bradley-Terry on reference vs another prompt's reference. Each
stand-in is written atomically to <root>/<key>/ with `standin.json` (its recipe, and measured after training: the
share of sampled completions that end with EOS); a folder whose recipe matches is reused.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPTNeoXConfig,
                          LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)

from rlhf.data import rlvr as data_rlvr
from rlhf.data.hub import TLDR_PROMPT, alpaca_splits
from rlhf.data.rlvr import GSM8K_ONE_SHOT, GSM8K_SYSTEM, MATH_SUFFIX, chat_prompt
from rlhf.generation import left_pad, sample
from rlhf.io import atomic_dir
from rlhf.judge import prompt as pairwise
from rlhf.judge import rlvr as judge_rlvr
from rlhf.models import encode_completion, encode_prompt
from rlhf.rehearsal.hub_fixtures import HUB_LAYOUTS, corpus
from rlhf.rewards.gold import reward_model_text

# Every hub model a paper config names (model.name, ensemble.model, gold.name) -> its stand-in. A paper config that
# names another model makes the overlay fail with one line saying to add it here.
HUB_MODELS = {
    "EleutherAI/pythia-410m-deduped": "pythia-small",
    "EleutherAI/pythia-1b-deduped": "pythia",
    "EleutherAI/pythia-2.8b-deduped": "pythia",
    "Qwen/Qwen2.5-0.5B": "qwen-small",
    "Qwen/Qwen2.5-1.5B": "qwen",
    "Qwen/Qwen2.5-3B": "qwen",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen-instruct",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen-instruct",
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": "skywork",
}
JUDGE = "judge"  # served by `vllm serve` under every judge model name a config asks for (gold.judge.model)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's chat template without its tool-calling branches (the pipeline sends none): a default system turn when the
# conversation has none, <|im_start|>role\n...<|im_end|>\n per turn, the assistant turn opened on request.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama 3.1's header format (Skywork-Reward-Llama-3.1's template, without the date preamble of the instruct models).
LLAMA_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

TOKENIZERS = {
    "pythia": dict(cls="GPTNeoXTokenizer", specials=["<|endoftext|>", "<|padding|>"],
                   tokens=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")),
    "qwen": dict(cls="Qwen2Tokenizer", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 tokens=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"), chat_template=QWEN_TEMPLATE),
    "qwen-instruct": dict(cls="Qwen2Tokenizer", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), chat_template=QWEN_TEMPLATE),
    "llama3": dict(cls="PreTrainedTokenizerFast", specials=["<|begin_of_text|>", "<|end_of_text|>",
                                                            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                            "[PAD]"],
                   tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="[PAD]"),
                   chat_template=LLAMA_TEMPLATE),
}


@dataclass(frozen=True)
class StandIn:
    arch: str                      # gpt_neox | qwen2 | llama_rm
    tokenizer: str                 # a TOKENIZERS key
    corpora: tuple[str, ...]       # what it is trained on: tldr, alpaca_farm, gsm8k, math, judge
    hidden: int = 64
    layers: int = 2
    heads: int = 2                 # head_dim 32: one vLLM's CPU attention supports
    kv_heads: int | None = None
    tied: bool = True              # input and output embeddings shared (Qwen2.5 up to 3B); Pythia's are not
    steps: int = 200
    lr: float = 3.0e-3
    max_length: int = 768
    extra: dict = field(default_factory=dict)


STANDINS = {
    "pythia": StandIn("gpt_neox", "pythia", ("tldr",), tied=False),
    "pythia-small": StandIn("gpt_neox", "pythia", ("tldr",), hidden=32, heads=1, layers=1, tied=False),
    "qwen": StandIn("qwen2", "qwen", ("tldr", "alpaca_farm"), kv_heads=1),
    "qwen-small": StandIn("qwen2", "qwen", ("tldr", "alpaca_farm"), hidden=32, heads=1, layers=1),
    "qwen-instruct": StandIn("qwen2", "qwen-instruct", ("gsm8k", "math"), kv_heads=1),
    "skywork": StandIn("llama_rm", "llama3", ("tldr", "alpaca_farm"), kv_heads=1, steps=150),
    # untied: its decision tokens' output rows are centred after training (balanced_choices) without touching how
    # the same tokens read in its prompt
    JUDGE: StandIn("qwen2", "qwen-instruct", ("judge",), kv_heads=1, tied=False, steps=150, max_length=640),
}
VOCAB_SIZE = 2048
RECIPE_VERSION = 3  # bump when the build below changes what a stand-in is


# --- texts --------------------------------------------------------------------------------------------------------

def _pairs(kind: str, folder: Path, tokenizer) -> list[tuple[str, str]]:
    """(prompt, completion) of a dataset folder, as the pipeline's data stage forms them (rlhf/data)."""
    if kind == "tldr":
        return [(TLDR_PROMPT.format(**{k: r[k] for k in ("subreddit", "title", "post")}), r["summary"].strip())
                for r in corpus(kind, folder)]
    if kind == "alpaca_farm":
        rows = [r for split in alpaca_splits(str(folder), None).values() for r in split]
        return [(r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}", r["output"])
                for r in rows]
    task = "gsm8k" if kind == "gsm8k" else "math"
    mapper = data_rlvr.gsm8k_row if task == "gsm8k" else data_rlvr.math_row
    rows = data_rlvr.with_prompts([mapper(r) for r in corpus(kind, folder)], task, tokenizer)
    return [(r["prompt"], r["reference"]) for r in rows]


def _judge_pairs(hub: Path, tokenizer, rng: random.Random) -> list[tuple[str, str]]:
    """Judge prompts (the pipeline's own, rlhf/judge) with the replies a sensible judge would give: the pairwise prompt
    prefers the reference over another prompt's reference; the RLVR prompt scores a correct answer 5, a wrong one 1."""
    texts = []
    refs = _pairs("tldr", hub / "tldr", tokenizer)[:150] + _pairs("alpaca_farm", hub / "alpaca_farm", tokenizer)[:150]
    for i, (prompt, reference) in enumerate(refs):
        other = refs[(i + 1 + rng.randrange(len(refs) - 1)) % len(refs)][1]
        first = rng.random() < 0.5
        a, b = (reference, other) if first else (other, reference)
        texts.append((chat_prompt(tokenizer, pairwise.messages(prompt, a, b)), f"Output ({'a' if first else 'b'})"))
    for r in [data_rlvr.gsm8k_row(r) for r in corpus("gsm8k", hub / "gsm8k")][:300]:
        right = rng.random() < 0.5
        answer = r["gold"] if right else str(int(r["gold"]) + rng.randint(1, 9))
        model_answer = f"<reasoning>\n{r['reference'].split('<reasoning>')[1].split('</reasoning>')[0].strip()}\n" \
                       f"</reasoning>\n<answer>\n{answer}\n</answer>"
        reply = judge_rlvr.reply_text("The final answer matches the solution." if right else
                                      "The final answer does not match the solution.", 5 if right else 1, 4, "xml")
        messages = judge_rlvr.messages(r["question"], model_answer, r["solution"], "xml", one_shot=True)
        texts.append((chat_prompt(tokenizer, messages), reply))
    return texts


def _corpus_texts(hub: Path) -> list[str]:
    """Everything any stand-in will read, for its BPE: the folders' texts and the judge prompts' fixed text."""
    texts = [json.dumps(r) for kind in HUB_LAYOUTS for r in corpus(kind, hub / kind)]
    texts += [GSM8K_SYSTEM, *GSM8K_ONE_SHOT, MATH_SUFFIX, QWEN_SYSTEM, pairwise.SYSTEM, pairwise.USER,
              judge_rlvr.INSTRUCTION, *judge_rlvr.TEMPLATES["xml"], json.dumps(judge_rlvr.ONE_SHOT),
              "TL;DR: SUBREDDIT: TITLE: POST: Output (a) Output (b) <reasoning> </reasoning> <answer> </answer>"]
    return texts


# --- tokenizers ---------------------------------------------------------------------------------------------------

def build_tokenizer(family: str, texts: list[str], folder: Path):
    """A byte-level BPE saved with the real model's tokenizer class and special tokens, then loaded back the way the
    pipeline loads a hub tokenizer (AutoTokenizer), so the class's own behaviour applies; trained with the
    pre-tokenizer and normalizer that class imposes (Qwen2Tokenizer replaces both), so its merges fit them."""
    spec = TOKENIZERS[family]

    def train(pre_tokenizer=None, normalizer=None):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=spec["specials"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        if family == "llama3":  # Llama 3 adds <|begin_of_text|> to every encoding
            bos = tok.token_to_id("<|begin_of_text|>")
            tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                               special_tokens=[("<|begin_of_text|>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, **spec["tokens"])
        if "chat_template" in spec:
            fast.chat_template = spec["chat_template"]
        fast.save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = spec["cls"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return AutoTokenizer.from_pretrained(folder)

    probe = train()
    return train(probe.backend_tokenizer.pre_tokenizer, probe.backend_tokenizer.normalizer)


# --- models -------------------------------------------------------------------------------------------------------

def build_model(spec: StandIn, tokenizer, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, intermediate_size=4 * spec.hidden, max_position_embeddings=4096,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if spec.arch == "gpt_neox":  # Pythia: partial rotary, parallel residual, untied head
        return AutoModelForCausalLM.from_config(GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True,
                                                              tie_word_embeddings=spec.tied, **common))
    if spec.arch == "qwen2":
        return AutoModelForCausalLM.from_config(Qwen2Config(num_key_value_heads=spec.kv_heads or spec.heads,
                                                            tie_word_embeddings=spec.tied, **common))
    config = LlamaConfig(num_key_value_heads=spec.kv_heads or spec.heads, tie_word_embeddings=False, num_labels=1,
                         **common)
    return AutoModelForSequenceClassification.from_config(config)


def _batches(items: list, batch: int, steps: int, rng: random.Random):
    for _ in range(steps):
        yield [items[rng.randrange(len(items))] for _ in range(batch)]


def train_causal(model, tokenizer, pairs: list[tuple[str, str]], spec: StandIn, rng: random.Random) -> None:
    """AdamW on prompt + completion + EOS with the loss on the completion and EOS (the pipeline's encoding)."""
    encoded = []
    for prompt, completion in pairs:
        p = encode_prompt(tokenizer, prompt)
        c = encode_completion(tokenizer, completion) + [tokenizer.eos_token_id]
        encoded.append(((p + c)[-spec.max_length:], ([-100] * len(p) + c)[-spec.max_length:]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    body, head = model.base_model, model.get_output_embeddings()
    model.train()
    for batch in _batches(encoded, 16, spec.steps, rng):
        ids, mask = left_pad([b[0] for b in batch], tokenizer.pad_token_id)
        labels, _ = left_pad([b[1] for b in batch], -100)
        hidden = body(input_ids=ids, attention_mask=mask,
                      position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        # the causal-LM loss transformers computes with labels=, but the head applied only where a label is: the judge's
        # ~550-token prompts carry ~20 labelled tokens (same losses to 4 digits; 1.5-2x faster per step in an
        # interleaved A/B on a busy 2-core machine, not a timing)
        target = labels[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(head(hidden[:, :-1][keep]).float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def train_reward(model, tokenizer, pairs: list[tuple[str, str]], spec: StandIn, rng: random.Random) -> None:
    """Bradley-Terry: a prompt's reference over another prompt's, through the chat template as the gold formats it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    tokenizer.padding_side = "right"
    model.train()
    for batch in _batches(list(range(len(pairs))), 16, spec.steps, rng):
        chosen = [reward_model_text(tokenizer, *pairs[i]) for i in batch]
        rejected = [reward_model_text(tokenizer, pairs[i][0], pairs[(i + 1 + rng.randrange(len(pairs) - 1)) % len(pairs)][1]) for i in batch]
        enc = tokenizer(chosen + rejected, padding=True, truncation=True, max_length=spec.max_length,
                        add_special_tokens=False, return_tensors="pt")
        r = model(**enc).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[:len(batch)] - r[len(batch):]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def balanced_choices(model, tokenizer, prompts: list[str], choices: tuple[str, str], rounds: int = 3) -> float:
    """Shift the output rows of two single-token choices so that greedy decoding picks each for about half of
    `prompts` (each ending where the choice is made); returns the share that picks the first. A judge trained a few
    hundred steps learns the reply format but not yet a preference, and its greedy pick would be the same for every
    pair: a constant label, which carries nothing into the proxy RM. The shift is along the mean hidden state, so
    which pairs get which label still depends on the input."""
    a, b = (tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c)[-1]) for c in choices)
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)
    hidden = model.model(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state[:, -1]
    direction = hidden.mean(0) / hidden.mean(0).square().sum()
    rows = model.get_output_embeddings().weight
    for _ in range(rounds):
        diff = hidden @ (rows[a] - rows[b])
        shift = diff.median() / 2
        rows[a] -= shift * direction
        rows[b] += shift * direction
    return (hidden @ (rows[a] - rows[b]) > 0).float().mean().item()


@torch.no_grad()
def sampling_check(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """Two completions per prompt at temperature 1: the share that end with EOS within max_new_tokens, and the share of
    pairs whose two completions differ (the sample stage drops identical pairs: a stand-in that always writes the same
    completion would leave nothing to label)."""
    rollout = sample(model, tokenizer, prompts, 2, max_new_tokens, 1.0, batch_size=len(prompts) * 2)
    ended = (rollout.completion_ids == tokenizer.eos_token_id) & rollout.completion_mask.bool()
    distinct = [a != b for a, b in zip(rollout.texts[0::2], rollout.texts[1::2])]
    return {"eos_fraction": ended.any(1).float().mean().item(), "distinct_pairs": sum(distinct) / len(distinct)}


# --- building -----------------------------------------------------------------------------------------------------

def recipe(key: str) -> dict:
    return {"key": key, "version": RECIPE_VERSION, "vocab_size": VOCAB_SIZE, **asdict(STANDINS[key])}


def _stamp(recipe_: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_, sort_keys=True).encode()).hexdigest()[:16]


def build_standin(key: str, root: Path, hub: Path, seed: int = 0) -> Path:
    """<root>/<key>: the stand-in's model and tokenizer folder (reused when its recipe is unchanged)."""
    folder, spec, want = Path(root) / key, STANDINS[key], recipe(key)
    card = folder / "standin.json"
    if card.is_file() and json.loads(card.read_text()).get("stamp") == _stamp(want):
        return folder
    rng = random.Random(seed)
    with atomic_dir(folder) as out:
        tokenizer = build_tokenizer(spec.tokenizer, _corpus_texts(Path(hub)), out)
        model = build_model(spec, tokenizer, seed)
        if "judge" in spec.corpora:
            pairs = _judge_pairs(Path(hub), tokenizer, rng)
        else:
            pairs = [pair for kind in spec.corpora for pair in _pairs(kind, Path(hub) / kind, tokenizer)]
        measured = {}
        if spec.arch == "llama_rm":
            train_reward(model, tokenizer, pairs, spec, rng)
        else:
            train_causal(model, tokenizer, pairs, spec, rng)
        if "judge" in spec.corpora:  # the decisions: which output (pairwise), correctness 5 or 1 (RLVR, GR App. C.5)
            pairwise = [p + " Output (" for p, c in pairs if c.startswith("Output")]
            # balanced over WRONG answers: a lenient judge that accepts about half of them, as small LLM judges do
            # (GR Sec. 5.3), so its correctness reward varies on a policy that is rarely right (the stand-ins are)
            scored = [p + " <judgement>\n" + c.split("</judgement>")[0].split("<judgement>\n")[1] +
                      "\n</judgement>\n<correctness_score>\n" for p, c in pairs
                      if c.startswith("<judgement>") and "does not match" in c]
            measured["first_choice_share"] = {"pairwise (a)": balanced_choices(model, tokenizer, pairwise, ("a", "b")),
                                              "rlvr correctness 5 of wrong answers": balanced_choices(
                                                  model, tokenizer, scored, ("5", "1"))}
        if spec.arch != "llama_rm":
            probe = [p for p, _ in rng.sample(pairs, min(32, len(pairs)))]
            measured.update(sampling_check(model, tokenizer, probe, 128))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        (out / "standin.json").write_text(json.dumps({"stamp": _stamp(want), "recipe": want, **measured}, indent=1))
    return folder
