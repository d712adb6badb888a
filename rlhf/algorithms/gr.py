"""Gradient regularization (GR paper section 5, Fig. 9, App. C.1): two estimators of one gradient.

GR follows the gradient of L + (gamma/2) ||grad_S L||^2, i.e. g + gamma * H g restricted to S, the perturbed
parameters (the transformer blocks and final norm; never embeddings or the output head). The paper's Eq. 5 has a
factor-2 slip; this follows Fig. 9.

finite_difference_gr, the paper's estimator, one update reusing the same rollouts for both passes:
  g1 = grad L(phi)                      (all micro-batches)   g1_hat = clip(g1, g1_clip)
  phi' = phi + eps * g1_hat             (S only, fp32 arithmetic)
  g2 = grad L(phi')                                           g2_hat = clip(g2, g2_clip)
  restore phi exactly;  grad = g1_hat + gamma * (g2_hat - g1_hat) / eps   on S,
                        g1_hat (or g2_hat / raw g2, as the authors' public code) on the others.
  With bf16 weights phi + eps * g1_hat rounds back to phi for almost every element (eps = 1e-3), and the difference
  then measures rounding, not H g: the realized perturbation ||phi'_stored - phi|| / ||eps * g1_hat|| is returned.

hvp_gr, exact at any precision: grad = g1_hat + gamma * H g1_hat on S by double backprop over the same rollouts and
  micro-batches, the eps -> 0 limit of the finite difference with g2 unclipped. With one micro-batch per rank the
  graph of the first backward is kept (one forward, one backward with create_graph, one double backward); with
  several, g1 is needed before any H v product, so a plain backward pass comes first.

Where the gradients live is abstracted by `GradientAccess`: `.grad` of each parameter in one process (the default),
or the update backends of rlhf/distributed.py (data parallel, DeepSpeed's partitioned buffers). Either way g1 (and
g2) are full gradients averaged over data-parallel ranks, so every rank perturbs identically and GR stays exact.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from rlhf.errors import ConfigError
from torch.nn.attention import SDPBackend, sdpa_kernel

EXCLUDED_GRAD = ("g1", "g2", "g2_raw")


@dataclass
class GRStats:
    g1_norm: float       # ||g1|| before clipping, global over all trainable parameters
    g2_norm: float       # ||g2|| before clipping (hvp: nan, there is no second gradient)
    loss: float          # this rank's L(phi): as returned by the closure / summed over the micro-batch losses
    curvature: float     # g1_hat^T H g1_hat / ||g1_hat||^2 on S: the estimator's curvature along g1 (FD: from g2)
    realized_perturbation: float = float("nan")  # FD: ||phi'_stored - phi|| / ||eps * g1_hat|| on S (1 = exact)
    perturbation_error: float = float("nan")     # FD: ||(phi'_stored - phi) - eps * g1_hat|| / ||eps * g1_hat|| (0 = exact)
    changed_fraction: float = float("nan")       # FD: share of the elements of S that the perturbation changed


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
    def current(self, params: list[torch.nn.Parameter]) -> Iterator[torch.Tensor]: ...
    def read(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]: ...
    def write(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None: ...
    def combine(self, params: list[torch.nn.Parameter],
                fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None: ...
    def master_weights(self, params: list[torch.nn.Parameter]) -> Iterator[torch.Tensor] | None: ...
    def mean_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def write_rank_average(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None: ...


class LocalGradients:
    """`.grad` of each parameter in one process (subclassed by the data-parallel torch backend)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def current(self, params):
        """Each parameter's full gradient in turn, without a copy where one is not needed (read only)."""
        for p in params:
            yield torch.zeros_like(p) if p.grad is None else p.grad.detach()

    def read(self, params):
        return [g.clone() for g in self.current(params)]

    def write(self, params, grads):
        """The full gradient, identical on every rank."""
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)

    def master_weights(self, params):
        """Each parameter's fp32 master copy (kept apart from the model's weights), or None where none is kept."""
        return None

    def combine(self, params, fn):
        """Parameter i's gradient g becomes fn(i, g), one parameter at a time: no second full copy of the gradient."""
        for i, p in enumerate(params):
            self.write([p], [fn(i, next(iter(self.current([p]))))])

    def mean_over_ranks(self, tensors):
        return tensors

    def write_rank_average(self, params, grads):
        """The gradient becomes the average over ranks of each rank's `grads` (one process: `grads`)."""
        self.write(params, grads)


def _clip_coef(grads: Iterable[torch.Tensor], max_norm: float) -> tuple[float, float]:
    """(global norm, scale) with torch.nn.utils.clip_grad_norm_'s convention; grads is read once, in turn."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_fp32(g)) for g in grads])).item()
    return norm, min(1.0, max_norm / (norm + 1e-6))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((_fp32(x) * _fp32(y)).sum() for x, y in zip(a, b))


def _split(model, perturb) -> tuple[list[torch.nn.Parameter], list[bool]]:
    """The trainable parameters and, for each, whether GR perturbs it."""
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = default_perturbed_parameters(model) if perturb is None else list(perturb)
    ids = {id(p) for p in perturbed}
    if not ids <= {id(p) for p in params}:
        raise ValueError("perturb contains parameters that are not trainable parameters of the model")
    return params, [id(p) in ids for p in params]


def _exact_masters(grads, params: list[torch.nn.Parameter]) -> Callable[[], Iterator[torch.Tensor]] | None:
    """A fresh iterator over `params`' fp32 master copies, where the backend keeps masters (`master_weights`) and each
    parameter equals its master rounded to its dtype (so that restoring from them is exact); else None."""
    masters = getattr(grads, "master_weights", None)
    if masters is None or masters(params) is None:
        return None
    if not all(torch.equal(p, m.to(p.dtype)) for p, m in zip(params, masters(params))):
        return None
    return lambda: masters(params)


def _check_excluded(excluded_grad: str) -> None:
    if excluded_grad not in EXCLUDED_GRAD:
        raise ValueError(f"excluded_grad must be one of {', '.join(EXCLUDED_GRAD)}")


def finite_difference_gr(model: torch.nn.Module, loss_closure: Callable[[bool], torch.Tensor | float], *,
                         gamma: float, eps: float, g1_clip: float = 10.0, g2_clip: float = 10.0,
                         perturb: Iterable[torch.nn.Parameter] | None = None, excluded_grad: str = "g1",
                         grads: GradientAccess | None = None,
                         on_weights_changed: Callable[[], None] | None = None) -> GRStats:
    """Leave the GR gradient where `grads` keeps the gradient of every trainable parameter of `model`
    (default: `.grad`).

    `loss_closure()` must run forward and backward over all micro-batches of the batch (accumulating the full,
    rank-averaged gradient where `grads` reads it) and may return the loss; it is called twice, at phi
    (`loss_closure(False)`) and at the perturbed phi' (`loss_closure(True)`).
    Parameters are restored bit-exactly before returning. excluded_grad: what the parameters outside S get,
    g1_hat (ours), g2_hat, or the raw unclipped g2 (the authors' code under DeepSpeed). `on_weights_changed` runs
    after perturbing and after restoring (the authors' code refreshes DeepSpeed's fp32 master weights there).
    """
    _check_excluded(excluded_grad)
    params, in_s = _split(model, perturb)
    grads = grads or LocalGradients(model)

    grads.zero()
    loss = loss_closure(False)
    g1 = grads.read(params)
    g1_norm, s1 = _clip_coef(g1, g1_clip)

    # The weights to restore after the second pass: the backend's fp32 master copies where the model's weights are
    # exactly those rounded (bf16 under either backend; checked here, one tensor at a time), else a saved copy of each
    # perturbed tensor. Not the masters when on_weights_changed refreshes them from the perturbed weights.
    s_params = [p for p, s in zip(params, in_s) if s]
    originals = None if on_weights_changed else _exact_masters(grads, s_params)
    saved = None if originals else [p.detach().clone() for p in s_params]

    def before_weights() -> Iterator[torch.Tensor]:  # each perturbed tensor's value at phi, in turn
        return (m.to(p.dtype) for p, m in zip(s_params, originals())) if originals else iter(saved)

    moved_sq, error_sq, intended_sq, changed, total = [], [], [], [], 0  # summed on the device: one sync
    with torch.no_grad():
        befores = before_weights()
        for p, g, s in zip(params, g1, in_s):
            if s:
                before = next(befores)
                step = eps * s1 * _fp32(g)
                p.copy_((_fp32(p) + step).to(p.dtype))
                moved = _fp32(p) - _fp32(before)
                moved_sq.append(moved.square().sum())
                error_sq.append((moved - step).square().sum())
                intended_sq.append(step.square().sum())
                changed.append((p != before).sum())
                total += p.numel()
    moved_sq, error_sq, intended_sq, changed = (torch.stack(x).sum().item() if x else 0.0
                                                for x in (moved_sq, error_sq, intended_sq, changed))
    if on_weights_changed:
        on_weights_changed()
    grads.zero()
    try:
        loss_closure(True)
    finally:
        with torch.no_grad():
            for p, before in zip(s_params, before_weights()):
                p.copy_(before)
        saved = None
        if on_weights_changed:
            on_weights_changed()
    # Memory: g1 (one full copy) and g2 where the backend keeps gradients; the final gradient replaces g2 one
    # parameter at a time and each part of g1 is dropped once used, so no second or third full copy is made.
    g2_norm, s2 = _clip_coef(grads.current(params), g2_clip)
    vd, vv = [], []  # per perturbed parameter: g1_hat . (g2_hat - g1_hat) / eps and g1_hat . g1_hat

    def final(i: int, b: torch.Tensor) -> torch.Tensor:
        a_hat, b_hat = s1 * _fp32(g1[i]), s2 * _fp32(b)
        g1[i] = None
        if not in_s[i]:
            return {"g1": a_hat, "g2": b_hat, "g2_raw": _fp32(b)}[excluded_grad]
        difference = (b_hat - a_hat) / eps
        vd.append((a_hat * difference).sum())
        vv.append((a_hat * a_hat).sum())
        return a_hat + gamma * difference

    grads.combine(params, final)
    curvature = (sum(vd) / sum(vv).clamp_min(1e-30)).item() if vv else float("nan")
    loss_value = loss.item() if isinstance(loss, torch.Tensor) else float(loss or 0.0)
    def ratio(x):
        return (x / intended_sq) ** 0.5 if intended_sq > 0 else float("nan")
    return GRStats(g1_norm, g2_norm, loss_value, curvature, ratio(moved_sq), ratio(error_sq),
                   changed / max(total, 1))


@contextlib.contextmanager
def double_backward_attention(model: torch.nn.Module):
    """Attention that has a double backward: SDPA's math kernel (the fused flash / memory-efficient kernels of CPU
    and CUDA have no derivative of their backward); eager attention needs nothing. FlashAttention-2 is refused."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    if impl.startswith("flash"):
        raise ConfigError(f"grpo.gr_estimator hvp needs attention with a double backward; the model uses {impl}: "
                          "load it with attn_implementation='sdpa' (run with the math kernel) or 'eager'")
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _grad(loss: torch.Tensor, params: list[torch.nn.Parameter], create_graph: bool) -> list[torch.Tensor]:
    out = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


def hvp_gr(model: torch.nn.Module, micro_losses: Sequence[Callable[[], torch.Tensor]], *, gamma: float,
           g1_clip: float = 10.0, perturb: Iterable[torch.nn.Parameter] | None = None, excluded_grad: str = "g1",
           grads: GradientAccess | None = None) -> GRStats:
    """Leave g1_hat + gamma * H g1_hat (on S) where `grads` keeps the gradient, by double backprop.

    `micro_losses[i]()` returns micro-batch i's share of this rank's loss at the current weights (forward only;
    the weighted shares sum to the loss whose rank average is L). H is the Jacobian of the gradient field the
    trainer follows: with one update per batch that is the on-policy surrogate's (rlhf.algorithms.losses), whose
    ratio is 1 at every phi. excluded_grad is the eps -> 0 limit of the finite difference's options: g2 -> g1, so
    "g1" and "g2" give g1_hat and "g2_raw" gives the unclipped g1.
    """
    _check_excluded(excluded_grad)
    params, in_s = _split(model, perturb)
    s_params = [p for p, s in zip(params, in_s) if s]
    grads = grads or LocalGradients(model)
    keep_graph = len(micro_losses) == 1  # else g1 must be complete before the first H v product

    with double_backward_attention(model):
        g1_local, kept, loss_value = [torch.zeros_like(_fp32(p)) for p in params], None, 0.0
        for micro_loss in micro_losses:
            loss = micro_loss()
            g = _grad(loss, params, create_graph=keep_graph)
            for acc, x in zip(g1_local, g):
                acc += x.detach()
            kept = [x for x, s in zip(g, in_s) if s] if keep_graph else None
            loss_value += loss.item()
        # Memory: one fp32 gradient, which becomes v and then the GR gradient in place, and Hv's accumulator (none
        # with one micro-batch). g1 is the rank average (one process: g1_local itself); every rank then writes
        # s1 g1 + gamma Hv_rank, whose rank average is the GR gradient, so this rank's g1 is not kept beside it.
        g1 = grads.mean_over_ranks(g1_local)
        del g1_local
        g1_norm, s1 = _clip_coef(g1, g1_clip)
        for g, s in zip(g1, in_s):
            if s:
                g.mul_(s1)
        v = [g for g, s in zip(g1, in_s) if s]  # s1 g1 on S: aliases of g1's tensors
        hv_local = [torch.zeros_like(x) for x in v] if len(micro_losses) > 1 else None
        for micro_loss in micro_losses:
            g_s = kept if keep_graph else _grad(micro_loss(), s_params, create_graph=True)
            hv = [x.detach() for x in _grad(_dot(g_s, v), s_params, create_graph=False)]
            kept = g_s = None
            if hv_local is None:  # one micro-batch: its H v as computed, in the weights' dtype
                hv_local = hv
            else:
                for acc, x in zip(hv_local, hv):
                    acc += x
            del hv

    vhv, vv = grads.mean_over_ranks([_dot(v, hv_local).double().reshape(1)])[0].item(), _dot(v, v).item()
    hv = iter(hv_local)
    for g, s in zip(g1, in_s):  # in place: s1 g1 + gamma H v on S, s1 g1 (or g1) elsewhere
        if s:
            g.add_(next(hv), alpha=gamma)
        elif excluded_grad != "g2_raw":
            g.mul_(s1)
    del v, hv_local, hv
    grads.zero()
    grads.write_rank_average(params, g1)
    return GRStats(g1_norm, float("nan"), loss_value, vhv / max(vv, 1e-30))
