"""GRPO sampling with vLLM, colocated: one engine per rank on the rank's own GPU, in the training process.

Selected by grpo.generation: vllm. The engine is built from the SFT folder, and before every step the trainer's
current weights are pushed into it (vLLM's model `load_weights`, which takes Hugging Face parameter names), so
completions always come from pi_phi. Sampling is the HF path's: pure temperature sampling (top_k off, top_p 1,
no repetition penalty), n = G completions per prompt contiguous, at most T_max new tokens, the prompt encoded by
the same function. The result is the same `Rollout`, so log-probs, losses and the proxy RM never see a difference.

Written against vLLM's documented offline API (LLM, SamplingParams, LLM.generate, reset_prefix_cache,
sleep/wake_up) and the colocation recipe of TRL's GRPO trainer ("external_launcher" under torchrun). vLLM is
imported here only, so nothing else needs it installed. This module has not been run against a real vLLM in
this repository's CI (see README: what ran where).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as td

from rlhf.errors import ConfigError
from rlhf.generation import Rollout, left_pad, to_rollout
from rlhf.models import encode_prompt


class VLLMSampler:
    def __init__(self, model_path: str | Path, tokenizer, *, dtype: str, max_model_len: int,
                 gpu_memory_utilization: float, seed: int, sleep_between_steps: bool = False):
        try:
            from vllm import LLM  # lazy: only the GPU environment has vLLM
        except ImportError as e:
            raise ConfigError(f"grpo.generation is 'vllm' but vllm cannot be imported ({e}); "
                              "run in envs/gpu.yaml or set grpo.generation: hf") from e

        self.tokenizer, self.sleeping = tokenizer, False
        self.sleep_between_steps = sleep_between_steps
        distributed = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        self.llm = LLM(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep_mode=sleep_between_steps,
            # Under torchrun each rank runs its own engine inside its process, on its own GPU.
            distributed_executor_backend="external_launcher" if distributed else None,
        )

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _engine_model(self):
        # The in-process model of vLLM's engine: the path TRL's colocate mode uses to push weights.
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's current weights into the engine (full tensors: ZeRO-2 keeps them on every rank)."""
        self._wake()
        self._engine_model().load_weights((name, p.detach()) for name, p in model.state_dict().items())
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sampling_params(self, num_per_prompt: int, max_new_tokens: int, temperature: float):
        from vllm import SamplingParams
        return SamplingParams(n=num_per_prompt, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                              repetition_penalty=1.0, max_tokens=max_new_tokens, skip_special_tokens=True)

    def __call__(self, prompts: list[str], num_per_prompt: int, max_new_tokens: int, temperature: float) -> Rollout:
        self._wake()
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                    sampling_params=self.sampling_params(num_per_prompt, max_new_tokens, temperature),
                                    use_tqdm=False)
        if self.sleep_between_steps:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed: the GPU memory goes to the update
            self.sleeping = True
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions = []
        for out in outputs:  # prompt order, n completions each: row i belongs to prompt i // n, as in the HF path
            for c in out.outputs:
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and c.stop_reason is None and (not ids or ids[-1] != eos):
                    ids.append(eos)  # stopped by EOS: keep the EOS decision in the completion, as generate() does
                completions.append(ids[:max_new_tokens] + [pad] * (max_new_tokens - len(ids[:max_new_tokens])))
        prompt_ids, prompt_mask = left_pad([ids for ids in encoded for _ in range(num_per_prompt)], pad)
        return to_rollout(self.tokenizer, prompt_ids, prompt_mask, torch.tensor(completions, dtype=torch.long))
