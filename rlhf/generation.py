"""Sampling completions with Hugging Face `generate`; rlhf/generation_vllm.py returns the same Rollout from vLLM."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.models import encode_prompt


@dataclass
class Rollout:
    """Prompts left-padded to a common length, completions right-padded after their first EOS."""
    prompt_ids: torch.Tensor       # [N, P]
    prompt_mask: torch.Tensor      # [N, P]
    completion_ids: torch.Tensor   # [N, T]
    completion_mask: torch.Tensor  # [N, T]: 1 up to and including the first EOS
    texts: list[str]               # decoded completions, stripped, without EOS
    sampler_logprobs: torch.Tensor | None = None  # [N, T] the sampler's log-probs of the tokens (vLLM; NaN: unknown)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def rows(self, index: slice) -> "Rollout":
        """A micro-batch: the same columns, a slice of the completions."""
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], self.texts[index],
                       None if self.sampler_logprobs is None else self.sampler_logprobs[index])


def left_pad(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def completion_mask_until_eos(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS (the EOS is a decision the policy made)."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what `generate` used."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], num_per_prompt: int, max_new_tokens: int,
           temperature: float, batch_size: int = 64) -> Rollout:
    """`num_per_prompt` completions per prompt, contiguous per prompt (row i belongs to prompt i // num_per_prompt).

    Pure temperature sampling: top_k=0 and top_p=1 override any generation_config defaults (top_k=50 there
    would silently change the sampling distribution the papers specify).
    """
    device = next(model.parameters()).device
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    encoded = [encode_prompt(tokenizer, p) for p in expanded]
    P = max(len(e) for e in encoded)
    out_prompt, out_pmask, out_comp = [], [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id, width=P)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        comp = gen[:, P:].cpu()
        comp = torch.nn.functional.pad(comp, (0, max_new_tokens - comp.shape[1]), value=tokenizer.pad_token_id)
        out_prompt.append(ids)
        out_pmask.append(mask)
        out_comp.append(comp)
    model.train(was_training)
    return to_rollout(tokenizer, torch.cat(out_prompt), torch.cat(out_pmask), torch.cat(out_comp))


def to_rollout(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor) -> Rollout:
    """Mask each completion after its first EOS, drop all-padding columns, decode (shared by HF and vLLM)."""
    completion_mask = completion_mask_until_eos(completion_ids, tokenizer.eos_token_id)
    # Drop columns past the longest completion: they are all padding, and the loss normalizer is the
    # configured T_max, not the tensor width, so only compute is saved.
    width = max(1, int(completion_mask.sum(1).max()))
    completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
             for ids, m in zip(completion_ids, completion_mask)]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts)
