"""Random streams that belong to one purpose each, so nothing else can shift them.

- `DeviceNoise`: Gaussian noise created on the device of the tensor it perturbs, from a generator on that device
  (a CPU generator's noise added to a GPU tensor fails; one generator per device keeps sharded models working).
- `PromptSampler`: which prompts each GRPO step trains on. It owns its `random.Random`, checkpointed with the run:
  the global `random` is also drawn by libraries (e.g. tenacity's retry jitter when an API judge is retried), and
  a draw there must not change every later training batch.
"""
from __future__ import annotations

import random

import torch


class DeviceNoise:
    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of t's shape, in fp32, on t's device."""
        generator = self._generators.get(t.device)
        if generator is None:
            generator = self._generators[t.device] = torch.Generator(device=t.device).manual_seed(self.seed)
        return torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)


class PromptSampler:
    def __init__(self, prompts: list[str], seed: int):
        self.prompts = prompts
        self._random = random.Random(seed)

    def batch(self, k: int) -> list[str]:
        """k distinct prompts."""
        return self._random.sample(self.prompts, k)

    def state(self):
        return self._random.getstate()

    def restore(self, state) -> None:
        self._random.setstate(state)
