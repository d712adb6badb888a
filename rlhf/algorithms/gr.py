"""Finite-difference gradient regularization (GR paper section 5, Fig. 9, App. C.1).

One update, reusing the same rollouts for both passes:
  g1 = grad L(phi)                      (all micro-batches)   g1_hat = clip(g1, g1_clip)
  phi' = phi + eps * g1_hat             (perturbed parameters only, fp32 arithmetic)
  g2 = grad L(phi')                                           g2_hat = clip(g2, g2_clip)
  restore phi exactly;  grad = g1_hat + gamma * (g2_hat - g1_hat) / eps   on the perturbed parameters,
                        g1_hat (or g2_hat, as the authors' public code) on the others.
As eps -> 0 without clipping this is g + gamma * H g, the gradient of L + (gamma/2) ||grad L||^2
(H g restricted to the perturbed parameters). The paper's Eq. 5 has a factor-2 slip; this follows Fig. 9.

Where the gradients live is abstracted by `GradientAccess`: `.grad` of each parameter in one process (the
default), or DeepSpeed's partitioned buffers (rlhf/distributed.py). Either way g1 and g2 are the full gradients,
averaged over data-parallel ranks, so every rank perturbs its copy of the weights identically and GR stays exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch


@dataclass
class GRStats:
    g1_norm: float       # ||g1|| before clipping, global over all trainable parameters
    g2_norm: float       # ||g2|| before clipping
    loss: float          # L(phi), as returned by the closure
    seconds_g1: float
    seconds_g2: float


def default_perturbed_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The transformer blocks and final norm of an HF causal LM: every trainable parameter except those of
    the input embeddings, the output head and any other embedding table (e.g. learned positions).

    Chosen by module identity and type, not by name substrings: names such as `output` or `embed` also occur
    inside attention blocks of some architectures.
    """
    excluded = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            excluded |= {id(p) for p in module.parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            excluded |= {id(p) for p in module.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 are upcast, float64 stays): the perturbation arithmetic of App. C.1."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class GradientAccess(Protocol):
    def zero(self) -> None: ...
    def read(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]: ...
    def write(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None: ...


class LocalGradients:
    """`.grad` of each parameter: one process, or data parallel with gradients all-reduced in place."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def read(self, params):
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    def write(self, params, grads):
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)


def _clip_coef(grads: list[torch.Tensor], max_norm: float) -> tuple[float, float]:
    """(global norm, scale) with torch.nn.utils.clip_grad_norm_'s convention."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_fp32(g)) for g in grads])).item()
    return norm, min(1.0, max_norm / (norm + 1e-6))


def finite_difference_gr(model: torch.nn.Module, loss_closure: Callable[[], torch.Tensor | float], *,
                         gamma: float, eps: float, g1_clip: float = 10.0, g2_clip: float = 10.0,
                         perturb: Iterable[torch.nn.Parameter] | None = None, excluded_grad: str = "g1",
                         grads: GradientAccess | None = None) -> GRStats:
    """Leave the GR gradient where `grads` keeps the gradient of every trainable parameter of `model`
    (default: `.grad`).

    `loss_closure()` must run forward and backward over all micro-batches of the batch (accumulating the full,
    rank-averaged gradient where `grads` reads it) and may return the loss. Parameters are restored bit-exactly
    before returning.
    """
    if excluded_grad not in ("g1", "g2"):
        raise ValueError("excluded_grad must be 'g1' or 'g2'")
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = default_perturbed_parameters(model) if perturb is None else list(perturb)
    perturbed_ids = {id(p) for p in perturbed}
    if not perturbed_ids <= {id(p) for p in params}:
        raise ValueError("perturb contains parameters that are not trainable parameters of the model")
    grads = grads or LocalGradients(model)

    grads.zero()
    t0 = time.perf_counter()
    loss = loss_closure()
    g1 = grads.read(params)
    t1 = time.perf_counter()
    g1_norm, s1 = _clip_coef(g1, g1_clip)

    saved = {id(p): p.detach().clone() for p in params if id(p) in perturbed_ids}
    with torch.no_grad():
        for p, g in zip(params, g1):
            if id(p) in perturbed_ids:
                p.copy_((_fp32(p) + eps * s1 * _fp32(g)).to(p.dtype))
    grads.zero()
    try:
        loss_closure()
        g2 = grads.read(params)
    finally:
        with torch.no_grad():
            for p in params:
                if id(p) in perturbed_ids:
                    p.copy_(saved[id(p)])
    t2 = time.perf_counter()
    g2_norm, s2 = _clip_coef(g2, g2_clip)

    final = []
    for p, a, b in zip(params, g1, g2):
        a_hat, b_hat = s1 * _fp32(a), s2 * _fp32(b)
        if id(p) in perturbed_ids:
            final.append(a_hat + gamma * (b_hat - a_hat) / eps)
        else:
            final.append(a_hat if excluded_grad == "g1" else b_hat)
    del g1, g2
    grads.write(params, final)
    loss_value = loss.item() if isinstance(loss, torch.Tensor) else float(loss or 0.0)
    return GRStats(g1_norm, g2_norm, loss_value, t1 - t0, t2 - t1)
