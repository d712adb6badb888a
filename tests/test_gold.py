"""The gold interface: programmatic and reward-model backends label and judge the same way."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.config import load_config
from rlhf.errors import RewardError
from rlhf.rewards.gold import ProgrammaticGold, RewardModelGold, make_gold, reward_model_text
from tests.conftest import write_config

PROMPT = "post : grace stole the chair . oscar sold the lamp . tldr :"


@pytest.fixture
def tiny_gold_rm(tiny_lm, tmp_path):
    """A tiny saved sequence-classification model standing in for Skywork-Reward."""
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "lm")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "gold")
    tok.save_pretrained(tmp_path / "gold")
    return tmp_path / "gold"


def _cfg(tmp_path, **gold):
    return load_config(write_config(tmp_path, gold={"type": "programmatic", **gold}))


def test_programmatic_gold_judges_by_true_reward(tmp_path):
    gold = make_gold(_cfg(tmp_path))
    assert isinstance(gold, ProgrammaticGold)
    out = gold.judge([PROMPT] * 3, ["grace stole chair", "grace", "grace stole chair"],
                     ["grace", "grace stole chair", "grace stole chair"])
    assert out.tolist() == [1.0, 0.0, 0.5]


def test_label_noise_follows_bradley_terry(tmp_path):
    gold = make_gold(_cfg(tmp_path, label_temperature=0.5))
    a, b = "grace stole chair", "grace stole"  # true reward 1.0 vs 2/3 for a 1-key-sentence post
    diff = gold.score([PROMPT], [a])[0] - gold.score([PROMPT], [b])[0]
    labels = gold.prefer([PROMPT] * 20000, [a] * 20000, [b] * 20000, np.random.default_rng(0))
    assert labels.mean() == pytest.approx(1 / (1 + np.exp(-diff / 0.5)), abs=0.01)
    noiseless = make_gold(_cfg(tmp_path, label_temperature=0.0))
    assert noiseless.prefer([PROMPT] * 50, [a] * 50, [b] * 50, np.random.default_rng(0)).all()


def test_reward_model_gold_scores_with_the_saved_model(tmp_path, tiny_gold_rm):
    cfg = _cfg(tmp_path, type="reward_model", name=str(tiny_gold_rm), batch_size=2)
    gold = make_gold(cfg)
    assert isinstance(gold, RewardModelGold)
    completions = ["grace stole chair", "oscar", "lamp lamp lamp lamp", "grace stole chair and oscar sold lamp"]
    scores = gold.score([PROMPT] * 4, completions)
    # batching sorted by length must not change a score: compare against one-at-a-time scoring
    single = np.array([gold.score([PROMPT], [c])[0] for c in completions])
    np.testing.assert_allclose(scores, single, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(scores, 6))) > 1
    judged = gold.judge([PROMPT] * 4, completions, completions[::-1])
    assert judged.tolist() == (np.sign(scores - scores[::-1]) * 0.5 + 0.5).tolist()


def test_reward_model_gold_needs_a_name(tmp_path):
    from rlhf.errors import ConfigError
    with pytest.raises(ConfigError, match="gold.name is required"):
        _cfg(tmp_path, type="reward_model")


def test_nan_gold_reward_is_an_error(tmp_path):
    gold = make_gold(_cfg(tmp_path))
    gold._score = lambda p, c: [float("nan")] * len(c)
    with pytest.raises(RewardError, match="non-finite"):
        gold.judge([PROMPT], ["x"], ["y"])


def test_reward_model_gold_chat_template_bf16_and_device_map(tmp_path, tiny_gold_rm):
    """The Skywork path: the RM's chat template formats (prompt, completion); bf16 weights and a device_map
    (accelerate's 'auto', all on CPU here) give the same ranking as fp32."""
    from rlhf.models import load_tokenizer
    tok = load_tokenizer(tiny_gold_rm)  # not AutoTokenizer: it would rebuild this word-level tokenizer as BPE
    plain = make_gold(_cfg(tmp_path, type="reward_model", name=str(tiny_gold_rm)))
    completions = ["grace stole chair", "oscar", "lamp lamp lamp lamp", "grace stole chair and oscar sold lamp"]
    without = plain.score([PROMPT] * 4, completions)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tiny_gold_rm)
    cfg = _cfg(tmp_path, type="reward_model", name=str(tiny_gold_rm), device_map="auto")
    fp32 = make_gold(cfg)
    assert reward_model_text(fp32.tokenizer, PROMPT, "oscar") == f"user : {PROMPT} assistant : oscar "
    with_template = fp32.score([PROMPT] * 4, completions)
    assert not np.allclose(with_template, without)  # the template changed the model's input
    cfg["model"]["dtype"] = "bfloat16"
    bf16 = make_gold(cfg)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16.score([PROMPT] * 4, completions), with_template, atol=0.1)


def test_device_map_auto_spreads_the_gold_only_in_a_one_process_job(tmp_path, tiny_gold_rm, monkeypatch):
    """device_map auto shards the gold over the visible GPUs in label/evaluate (one process); in a data-parallel job
    (rank 0's evaluations inside GRPO, WORLD_SIZE > 1) every GPU belongs to a rank, so the gold loads on the rank's
    own device instead."""
    import rlhf.rewards.gold
    seen, real = [], rlhf.rewards.gold.load_reward_model

    def spy(*args, **kwargs):
        seen.append(kwargs["device_map"])
        return real(*args, **kwargs)
    monkeypatch.setattr(rlhf.rewards.gold, "load_reward_model", spy)
    cfg = _cfg(tmp_path, type="reward_model", name=str(tiny_gold_rm), device_map="auto")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make_gold(cfg, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "8")
    gold = make_gold(cfg, torch.device("cpu"))
    assert seen == ["auto", None] and gold.device == torch.device("cpu")
