"""Loading code shared by the tiny model and hub models: tokenizer, generation, RM scoring."""
import json

import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.generation import completion_mask_until_eos, sample
from rlhf.models import build_word_tokenizer, load_reward_model, load_tokenizer, rm_input_ids
from rlhf.rewards.proxy_rm import RewardScorer


def test_saved_tiny_tokenizer_round_trips_through_the_project_loader(tiny_lm, tmp_path):
    """A word-level tokenizer saved beside a qwen2 config must not come back as an empty BPE tokenizer."""
    model, tok = tiny_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    loaded = load_tokenizer(tmp_path)
    text = "post : alice lost the car . tldr :"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())
    assert loaded.decode(ids) == text
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>" and loaded.pad_token_id != loaded.eos_token_id


def _save_without_pad(tmp_path):
    tok = build_word_tokenizer(["hello", "world"])
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_tokenizer_without_pad_token_is_a_clear_error(tmp_path):
    _save_without_pad(tmp_path)
    with pytest.raises(ConfigError, match="model.pad_token"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_pad_token_takes_the_configured_one(tmp_path):
    _save_without_pad(tmp_path)
    assert load_tokenizer(tmp_path, pad_token="<unk>").pad_token == "<unk>"


def test_completion_mask_keeps_tokens_through_first_eos():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(completion_mask_until_eos(ids, eos), expected)


def test_sampling_groups_are_contiguous_and_texts_match_tokens(tiny_lm):
    model, tok = tiny_lm
    torch.manual_seed(0)
    prompts = ["post : alice lost the car . tldr :", "post : bob : tldr :"]  # different lengths: left padding
    r = sample(model, tok, prompts, 3, 7, 1.0)
    assert r.completion_ids.shape[0] == 6 and r.completion_ids.shape[1] <= 7
    assert r.prompt_mask[0].sum() == len(prompts[0].split()) and r.prompt_mask[3].sum() == len(prompts[1].split())
    for ids, m, text in zip(r.completion_ids, r.completion_mask, r.texts):
        kept = [t for t in ids[m.bool()].tolist() if t != tok.eos_token_id]
        assert tok.decode(kept, skip_special_tokens=True).strip() == text


def test_left_padding_does_not_change_logprobs(tiny_lm):
    """The same completion scored alone and next to a longer prompt gets the same log-probs."""
    from rlhf.generation import Rollout
    from rlhf.policy import token_logprobs
    model, tok = tiny_lm
    short, long_ = tok("post : bob tldr :")["input_ids"], tok("post : alice lost the car . tldr :")["input_ids"]
    comp = torch.tensor([[10, 11, 1]])
    pad = tok.pad_token_id

    def rollout(prompts):
        w = max(map(len, prompts))
        ids = torch.tensor([[pad] * (w - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
        n = len(prompts)
        return Rollout(ids, mask, comp.repeat(n, 1), torch.ones(n, 3, dtype=torch.long), [""] * n)

    alone = token_logprobs(model, rollout([short]))
    padded = token_logprobs(model, rollout([long_, short]))[1:]
    torch.testing.assert_close(alone, padded, rtol=1e-4, atol=1e-5)


def test_scorer_reward_equals_the_models_own_logits_and_returns_features(tiny_lm, tmp_path):
    model, tok = tiny_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path, tok).eval()
    torch.nn.init.normal_(rm.score.weight)
    prompts = ["post : alice lost the car . tldr :", "post : bob tldr :"]
    completions = ["alice lost car", "bob bob bob bob"]
    scores = RewardScorer(rm, tok)(prompts, completions)
    assert scores.features.shape == (2, rm.config.hidden_size)
    for i in range(2):
        ids = torch.tensor([rm_input_ids(tok, prompts[i], completions[i])])
        assert scores.rewards[i].item() == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(rm.score(scores.features).squeeze(-1), scores.rewards)


def test_scorer_rejects_nan_rewards(tiny_lm, tmp_path):
    from rlhf.errors import RewardError
    model, tok = tiny_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path, tok)
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    with pytest.raises(RewardError, match="non-finite"):
        RewardScorer(rm, tok)(["post : a tldr :"], ["a"])


def test_device_auto_never_falls_back_to_the_cpu_in_a_job_with_gpus(monkeypatch):
    """No usable CUDA (this machine, or torch built for a newer CUDA than the driver): auto is the CPU only where no
    GPU was given; in a job with GPUs it is a one-line error, and device cuda is one too."""
    from rlhf.models import device_from_config
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    cfg = lambda device: {"resources": {"device": device}}  # noqa: E731
    assert device_from_config(cfg("auto")) == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_from_config(cfg("auto")) == torch.device("cpu")
    for name, value in (("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_GPUS_ON_NODE", "8")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=f"resources.device auto: this job has GPUs \\({name}={value}\\)"):
            device_from_config(cfg("auto"))
        monkeypatch.delenv(name)
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/nvidia0"])
    with pytest.raises(ConfigError, match="this job has GPUs \\(/dev/nvidia0 exists\\)"):
        device_from_config(cfg("auto"))
    with pytest.raises(ConfigError, match="resources.device cuda: torch .* cannot use CUDA here"):
        device_from_config(cfg("cuda"))
    assert device_from_config(cfg("cpu")) == torch.device("cpu")
