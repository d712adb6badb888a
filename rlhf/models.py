"""Tokenizers, policies and reward models: the same loading code for the tiny miniature model and a hub model.

The tiny model is built from a transformers config and saved with `save_pretrained`, so every later stage
loads it exactly like `Qwen/Qwen2.5-1.5B`.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GPTNeoXConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Config)

from rlhf.errors import ConfigError, DataError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Classes under which a tokenizer.json is the whole truth. AutoTokenizer on a folder whose config.json says
# qwen2 rebuilds such a word-level tokenizer as byte-level BPE that encodes everything to [] (transformers 5),
# so these are loaded through PreTrainedTokenizerFast directly.
_VERBATIM_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def granted_gpus() -> str | None:
    """What says this process was given GPUs (Slurm's or the container's variables, NVIDIA device files), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip() and visible.strip() not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if os.environ.get(name, "").strip() not in ("", "0"):
            return f"{name}={os.environ[name]}"
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return f"{devices[0]} exists" if devices else None


def _cuda_unusable() -> str:
    return (f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU build'}) cannot use CUDA "
            "here (torch.cuda.is_available() is False; a wheel built for a newer CUDA than the driver supports warns "
            "and falls back like this)")


def device_from_config(cfg: dict) -> torch.device:
    """resources.device: cuda, cuda:N, cpu, or auto (CUDA when usable). auto never falls back to the CPU in a job
    that was given GPUs: an 8-rank GRPO job would otherwise train for days on gloo with one warning in its log."""
    name = cfg["resources"]["device"]
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        granted = granted_gpus()
        if granted:
            raise ConfigError(f"resources.device auto: this job has GPUs ({granted}) but {_cuda_unusable()}: install "
                              "a torch build the driver supports, or set resources.device: cpu to run on the CPU")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"resources.device {name}: {_cuda_unusable()}; set resources.device: cpu to run on the CPU")
    return torch.device(name)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a closed vocabulary; whitespace-split, decoded with single spaces."""

    vocab = {w: i for i, w in enumerate([PAD, EOS, UNK] + [w for w in dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No word carries the prefix, so this joins words with spaces. Without cleanup=False it would also glue
    # punctuation ("car ." -> "car."), and decoded completions would re-tokenize to <unk> for the reward model.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)


def _is_local(path: str | Path) -> bool:
    return Path(path).exists()


def load_tokenizer(path: str | Path, pad_token: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer, make sure it has a pad token and that it actually encodes text."""
    path = str(path)
    if _is_local(path) and not (Path(path) / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: no tokenizer_config.json (is this a saved model folder?)")
    tok_class = None
    if _is_local(path):
        tok_class = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    try:
        if tok_class in _VERBATIM_CLASSES:
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise DataError(f"cannot load tokenizer from {path}: {e}") from None
    if tok.pad_token is None:
        if pad_token is None:
            raise ConfigError(f"tokenizer at {path} has no pad token; set model.pad_token in the config "
                              "(a token of its vocabulary, e.g. '<|padding|>' for Pythia)")
        tok.pad_token = pad_token
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer at {path} has no eos token; completions could never end")
    probe = " ".join(tok.convert_ids_to_tokens(list(range(min(8, len(tok))))))
    if not tok(probe, add_special_tokens=False)["input_ids"] or not tok("summary", add_special_tokens=False)["input_ids"]:
        raise DataError(f"tokenizer at {path} encodes text to an empty sequence (a word-level tokenizer rebuilt "
                        f"as BPE?); its class is {type(tok).__name__}")
    return tok


def tokenizer_of(folder, cfg: dict):
    """The tokenizer saved with a model folder (the SFT policy's, for every stage after SFT)."""
    return load_tokenizer(folder, pad_token=cfg["model"]["pad_token"])


def build_tiny_causal_lm(build: dict, tokenizer: PreTrainedTokenizerBase, seed: int):
    """A randomly initialised causal LM from the config's shape: tiny for the miniature, or a real model's shape
    (vocab_size pads the embedding beyond the word-level tokenizer, whose ids stay the first rows)."""
    torch.manual_seed(seed)
    vocab = max(len(tokenizer), build.get("vocab_size") or 0)
    common = dict(vocab_size=vocab, hidden_size=build["hidden_size"],
                  num_hidden_layers=build["num_layers"], num_attention_heads=build["num_heads"],
                  intermediate_size=build["intermediate_size"],
                  max_position_embeddings=build["max_position_embeddings"], tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id)
    if build["arch"] == "qwen2":
        config = Qwen2Config(num_key_value_heads=build.get("num_key_value_heads") or build["num_heads"], **common)
    else:
        config = GPTNeoXConfig(**common)
    return AutoModelForCausalLM.from_config(config)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_model_dir(path: str | Path) -> None:
    if _is_local(path) and not (Path(path) / "config.json").is_file():
        raise DataError(f"{path}: not a saved model folder (no config.json)")
    if not _is_local(path) and str(path).startswith((".", "/", "results")):
        raise DataError(f"model folder not found: {path} (run the stage that produces it first)")


def load_causal_lm(path: str | Path, dtype: str = "float32", device: torch.device | str = "cpu"):
    _check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype))
    return model.to(device)


def load_reward_model(path: str | Path, tokenizer: PreTrainedTokenizerBase, dtype: str = "float32",
                      device: torch.device | str = "cpu", device_map: str | None = None):
    """A sequence-classification model with one output. From a causal-LM folder this adds a fresh scalar head.
    device_map ('auto') shards the model over the visible GPUs instead of moving it to `device`."""
    _check_model_dir(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=_dtype(dtype),
                                                               device_map=device_map)
    # The reward is read at the last non-pad token; the model finds it through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model if device_map else model.to(device)



# --- BSPO's ScoreLM: the reward model with its language-model head kept (rlhf/algorithms/bspo.py) ---

def attach_behavior_head(model, folder: str | Path) -> None:
    """Give a sequence-classification model the LM head of the causal LM saved in `folder`, so one backbone pass gives
    the reward and the next-token distribution. Tied embeddings need nothing (the head is the input embedding); an
    untied head is attached under the causal-LM class's own attribute name, so the saved folder loads as that causal
    LM too. The head is taken from the causal LM as transformers loads it (checkpoint key names differ from attribute
    names across versions, e.g. GPT-NeoX's embed_out), once per stage start."""
    model.behavior_head_name = None  # a plain attribute (not a module): behavior_logits reads it
    if model.config.tie_word_embeddings:
        return
    _check_model_dir(folder)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=model.dtype)
    head = lm.get_output_embeddings()
    name = next(n for n, module in lm.named_children() if module is head)
    del lm
    setattr(model, name, head.to(next(model.parameters()).device).requires_grad_(True))
    model.behavior_head_name = name


def behavior_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from last-layer hidden states of a model prepared by attach_behavior_head."""
    if not hasattr(model, "behavior_head_name"):
        raise TypeError("behavior_logits needs a model prepared by attach_behavior_head")
    if model.behavior_head_name is None:
        return torch.nn.functional.linear(hidden, model.get_input_embeddings().weight)
    return getattr(model, model.behavior_head_name)(hidden)


def behavior_token_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, predicted: torch.Tensor,
                            chunk_tokens: int | None = None) -> torch.Tensor:
    """log beta of the marked tokens, flat in row order: token t is read from the state at position t - 1, so
    `predicted` [N, T - 1] marks tokens 1..T-1. In chunks of chunk_tokens (None: one), so the [tokens, vocabulary]
    logits stay bounded at a paper-scale vocabulary. The one place of this offset for the ScoreLM's loss and scoring."""
    states, targets = hidden[:, :-1][predicted], ids[:, 1:][predicted]
    chunk = chunk_tokens or max(len(targets), 1)
    return torch.cat([behavior_logits(model, h).float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
                      for h, t in zip(states.split(chunk), targets.split(chunk))])

# --- text <-> tokens, shared by SFT, RM training and scoring so the three always agree ---

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completions are stored stripped; they follow the prompt after one space (BPE merges it into the token)."""
    return tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"]


def rm_input_ids(tokenizer, prompt: str, completion: str) -> list[int]:
    """Prompt + completion + EOS: the reward is read at the EOS, as in TRL's RewardTrainer."""
    return encode_prompt(tokenizer, prompt) + encode_completion(tokenizer, completion) + [tokenizer.eos_token_id]


# --- shapes: what a model's parameter count and memory follow from (rlhf plan, the memory bench) ---

@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    arch: str = "llama"   # llama (Qwen2, Llama: gated MLP) or gpt_neox

    @property
    def params(self) -> int:
        h, hd = self.hidden, self.hidden // self.heads
        if self.arch == "gpt_neox":
            layer = 4 * h * h + 4 * h + 2 * h * self.intermediate + self.intermediate + h + 4 * h
        else:
            layer = 2 * h * h + 2 * h * self.kv_heads * hd + 3 * h * self.intermediate + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    @classmethod
    def of_config(cls, c: dict) -> "Shape":
        arch = "gpt_neox" if c.get("model_type") == "gpt_neox" else "llama"
        return cls(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"], c["vocab_size"],
                   bool(c.get("tie_word_embeddings", arch != "gpt_neox")), arch)


# The papers' models, read from their config.json files (so `plan` works before anything is downloaded).
KNOWN = {
    "EleutherAI/pythia-410m-deduped": Shape(1024, 24, 16, 16, 4096, 50304, False, "gpt_neox"),
    "EleutherAI/pythia-1b-deduped": Shape(2048, 16, 8, 8, 8192, 50304, False, "gpt_neox"),
    "EleutherAI/pythia-2.8b-deduped": Shape(2560, 32, 32, 32, 10240, 50304, False, "gpt_neox"),
    "Qwen/Qwen2.5-0.5B": Shape(896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B": Shape(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-3B": Shape(2048, 36, 16, 2, 11008, 151936, True),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": Shape(4096, 32, 32, 8, 14336, 128257, False),
}
KNOWN["Qwen/Qwen2.5-0.5B-Instruct"] = KNOWN["Qwen/Qwen2.5-0.5B"]
KNOWN["Qwen/Qwen2.5-1.5B-Instruct"] = KNOWN["Qwen/Qwen2.5-1.5B"]
