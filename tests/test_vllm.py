"""GRPO sampling through vLLM (rlhf/generation_vllm.py).

vLLM is not installable on the CPU machines this suite runs on. The first tests drive VLLMSampler against a
stand-in `vllm` module that records what it is asked and answers in vLLM's output structure: they check our side
of the contract (sampling parameters equal to the HF path's, prompt tokens, completion order, EOS handling,
weights pushed every step). The last test runs the real engine and skips unless vLLM and a GPU are present.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from rlhf.generation import sample
from rlhf.models import encode_prompt

PROMPTS = ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"]


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str
    stop_reason: object = None


@dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


@dataclass
class _FakeLLM:
    """Records the calls VLLMSampler makes; completions are scripted per call."""
    kwargs: dict
    script: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    loaded: list = field(default_factory=list)

    def __post_init__(self):
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=lambda ws: self.loaded.append(dict(ws))))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append(("generate", prompts, sampling_params))
        return [_Output(p["prompt_token_ids"], [_Completion(*c) for c in self.script[i]]) for i, p in enumerate(prompts)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    made = []

    def LLM(**kwargs):
        made.append(_FakeLLM(kwargs))
        return made[-1]

    module.LLM = LLM
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    return made


def test_sampler_asks_vllm_for_the_hf_sampling_and_returns_the_same_rollout(fake_vllm, tiny_lm, tmp_path):
    from rlhf.generation_vllm import VLLMSampler
    model, tok = tiny_lm
    model.save_pretrained(tmp_path)
    sampler = VLLMSampler(tmp_path, tok, dtype="bfloat16", max_model_len=64, gpu_memory_utilization=0.3, seed=7)
    llm = fake_vllm[0]
    assert llm.kwargs["model"] == str(tmp_path) and llm.kwargs["seed"] == 7
    assert llm.kwargs["distributed_executor_backend"] is None  # no process group: a plain one-GPU engine
    eos, word = tok.eos_token_id, tok.convert_tokens_to_ids("the")
    llm.script = [[([word, eos], "stop"), ([word, word, word], "length")],
                  [([word], "stop"), ([word, word, eos], "stop")]]  # vLLM may or may not report the EOS token
    rollout = sampler(PROMPTS, 2, 3, 0.7)

    _, prompts, params = llm.calls[0]
    assert params == dict(n=2, temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=3,
                          skip_special_tokens=True)
    assert [p["prompt_token_ids"] for p in prompts] == [encode_prompt(tok, p) for p in PROMPTS]
    # Same layout as the HF path: G completions per prompt, contiguous; EOS kept and counted; left-padded prompts.
    hf = sample(model, tok, PROMPTS, 2, 3, 0.7)
    assert rollout.prompt_ids.tolist() == hf.prompt_ids.tolist()
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert rollout.completion_ids[2].tolist()[:2] == [word, eos]  # EOS appended where vLLM left it out
    assert rollout.texts == ["the", "the the the", "the", "the the"]


def test_sampler_pushes_the_trainers_weights_and_sleeps_during_the_update(fake_vllm, tiny_lm, tmp_path):
    from rlhf.generation_vllm import VLLMSampler
    model, tok = tiny_lm
    sampler = VLLMSampler(tmp_path, tok, dtype="float32", max_model_len=None, gpu_memory_utilization=0.3, seed=0,
                          sleep_between_steps=True)
    llm = fake_vllm[0]
    llm.script = [[([tok.eos_token_id], "stop")]]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    sampler.load_weights(model)
    pushed = llm.loaded[-1]
    assert pushed.keys() == model.state_dict().keys()
    assert all(torch.equal(pushed[k], v) for k, v in model.state_dict().items())
    sampler(PROMPTS[:1], 1, 2, 1.0)
    sampler.load_weights(model)
    assert [c[0] for c in llm.calls] == ["reset_prefix_cache", "generate", "sleep", "wake_up", "reset_prefix_cache"]


def test_vllm_generation_on_cpu_is_a_config_error(micro_run, tmp_path, capsys):
    from rlhf.cli import main
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0", "grpo.generation=vllm"]) == 2
    assert "grpo.generation: vllm needs a GPU" in capsys.readouterr().err


def _real_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _real_vllm(), reason="needs vllm and a GPU (the GPU environment, envs/gpu.yaml)")
def test_real_vllm_engine_follows_the_trainer(tiny_lm, tmp_path):
    """Near-greedy sampling: vLLM's completions equal HF generate's, before and after new weights are pushed."""
    from rlhf.generation_vllm import VLLMSampler
    model, tok = tiny_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = model.cuda()
    sampler = VLLMSampler(tmp_path, tok, dtype="float32", max_model_len=64, gpu_memory_utilization=0.2, seed=0)
    for _ in range(2):
        sampler.load_weights(model)
        ours = sampler(PROMPTS, 2, 6, 1e-4)
        hf = sample(model, tok, PROMPTS, 2, 6, 1e-4)
        assert ours.texts == hf.texts
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
