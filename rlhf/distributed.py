"""Data-parallel training: the process group, the two ways a GRPO update is applied, and the SFT/RM Trainer's
DeepSpeed config.

Launched by torchrun (rlhf/cluster.py writes the command), every rank holds the whole model, samples and
scores its share of the step's prompts, and the step is exact for the global batch:
  - rewards and RM features are gathered, so group means and SignCert's quantile are over the global batch;
  - each rank's loss is normalised by its own B_local * G * T_max and the gradients are averaged over ranks,
    which equals the single-process loss over the global batch;
  - GR reads the full rank-averaged g1 and g2, so every rank applies the same perturbation.

Two update backends, chosen by grpo.backend (auto: DeepSpeed on CUDA, torch otherwise):
  TorchUpdate      torch AdamW; with several ranks the gradients are all-reduced (plain data parallel).
  DeepSpeedUpdate  DeepSpeed ZeRO (stage 2 by default, as in the papers): gradients and optimizer state are
                   partitioned over ranks. GR reads and writes full gradients through DeepSpeed's documented
                   safe_get_full_grad / safe_set_full_grad, which assemble them from the partitions.
Without torchrun there is no process group and the same code runs as one process (the CPU miniature).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import torch.distributed as td

from rlhf.algorithms.gr import LocalGradients
from rlhf.errors import ConfigError
from rlhf.io import atomic_dir

if TYPE_CHECKING:
    from rlhf.settings import GRPOSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_one_rank() -> None:
    """Without torchrun, set what it would set for a single process: DeepSpeed (and env:// rendezvous) read it."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def skip_cpu_shm_build(device: torch.device) -> None:
    """On CPU, DeepSpeed JIT-compiles its shared-memory all-reduce the first time it starts (~50 s on 2 cores, once per
    machine): an optimisation for multi-process CPU training this project never needs (ranks talk through gloo; on
    GPUs it is never built). Marking the op incompatible makes DeepSpeed go without it."""
    if device.type == "cpu":
        import deepspeed.ops  # lazy: only the DeepSpeed backend needs it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (td.is_available() and td.is_initialized())

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
        MASTER_ADDR/PORT); without it, a single process. Each rank takes GPU LOCAL_RANK."""
        if "WORLD_SIZE" not in os.environ:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not td.is_initialized():
            # Rank 0 alone runs the gold evaluation while the others wait: allow for a long one.
            init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
        return cls(td.get_rank(), td.get_world_size(), device)

    def per_rank(self, n: int, what: str) -> int:
        """n split evenly over the ranks (a batch size that does not split is a config error)."""
        if n % self.world_size:
            raise ConfigError(f"{what} = {n} does not split over {self.world_size} ranks")
        return n // self.world_size

    def shard(self, items: list, what: str = "grpo.prompts_per_step") -> list:
        """This rank's contiguous share of a list that every rank holds in full."""
        k = self.per_rank(len(items), what)
        return items[self.rank * k:(self.rank + 1) * k]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor (same shape on every rank) along dim 0, in rank order."""
        if not self.enabled:
            return t
        x = t.to(self.device).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        td.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list | None:
        """Every rank's picklable `obj` on rank 0, in rank order; None on the other ranks."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        td.gather_object(obj, out, dst=0)
        return out

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a gathered tensor."""
        k = self.per_rank(t.shape[0], "gathered rows")
        return t[self.rank * k:(self.rank + 1) * k]

    def mean(self, stats: dict) -> dict:
        """Scalar statistics averaged over ranks (every rank must pass the same keys)."""
        if not self.enabled:
            return stats
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
        x = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        td.all_reduce(x)
        return {**stats, **dict(zip(keys, (x / self.world_size).tolist()))}

    def mean_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor averaged over ranks, in at least fp32, through one flat all-reduce."""
        if not self.enabled:
            return tensors
        dtype = torch.promote_types(torch.float32, tensors[0].dtype)
        flat = torch.cat([t.detach().to(self.device, dtype).reshape(-1) for t in tensors])
        td.all_reduce(flat)
        flat /= self.world_size
        return [part.view_as(t).to(t.device) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def barrier(self) -> None:
        if self.enabled:
            td.barrier()

    def broadcast(self, obj):
        """rank 0's picklable object on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        destroy_process_group()


_OWN_GROUP = [False]  # whether this project made the default process group (a vLLM engine may have made it instead)


# Modules that take the world group as a default argument (`def barrier(self, group=GroupMember.WORLD)`), a value
# Python evaluates once, when the module is first imported. Imported after the group exists (DeepSpeed by the update
# backend, torch.distributed.nn by transformers' torch._dynamo), they keep it referenced for the life of the process:
# destroy_process_group() then frees nothing, the gloo/NCCL threads outlive it, and a rank whose work was done could
# abort at interpreter shutdown ("terminate called without an active exception", seen once in CI on the 2-rank
# GRPO test). Imported before the group is made, their defaults are None.
WORLD_GROUP_DEFAULTS = ("torch.distributed.nn.functional", "deepspeed.comm.torch")


def init_process_group(backend: str, **kwargs) -> None:
    for name in WORLD_GROUP_DEFAULTS:
        with contextlib.suppress(ImportError):  # deepspeed: only where installed
            importlib.import_module(name)
    td.init_process_group(backend, **kwargs)
    _OWN_GROUP[0] = True


def destroy_process_group() -> None:
    """Tear down the process group we made, through DeepSpeed when it has used it: DeepSpeed caches a clone of the
    world group, and an engine created later in the same process would otherwise reach for the destroyed one.
    A group a vLLM engine made in this process is the engine's to tear down (VLLMSampler.close)."""
    if not (td.is_available() and td.is_initialized() and _OWN_GROUP[0]):
        return
    _OWN_GROUP[0] = False
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # where DeepSpeed keeps its backend (`cdb`)
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()
    else:
        td.destroy_process_group()


@contextlib.contextmanager
def shared_atomic_dir(dist: Dist, final: str | Path):
    """rlhf.io.atomic_dir for every rank: rank 0 makes the temporary folder, every rank writes its part into it,
    and rank 0 renames it into place only after all ranks are done."""
    with atomic_dir(final) if dist.is_main else contextlib.nullcontext() as out:
        out = Path(dist.broadcast(str(out) if dist.is_main else None))
        yield out
        dist.barrier()


def use_deepspeed(backend: str, device: torch.device) -> bool:
    """backend 'auto': DeepSpeed on CUDA when it is installed."""
    if backend == "auto":
        return device.type == "cuda" and deepspeed_available()
    if backend == "deepspeed" and not deepspeed_available():
        raise ConfigError("backend 'deepspeed' is set but deepspeed is not installed (pip install deepspeed, "
                          "or use the GPU environment envs/gpu.yaml)")
    return backend == "deepspeed"


def trainer_deepspeed_config(backend: str, zero_stage: int, device: torch.device) -> dict | None:
    """The `deepspeed` argument of an HF Trainer for the sft/rm settings (None: plain Trainer). Everything but
    the ZeRO stage is 'auto', so the Trainer fills it from its own arguments (batch size, clipping, precision)."""
    if not use_deepspeed(backend, device):
        return None
    as_one_rank()
    skip_cpu_shm_build(device)
    auto = "auto"
    return {"zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": auto},
            "fp16": {"enabled": auto}, "train_micro_batch_size_per_gpu": auto, "train_batch_size": auto,
            "gradient_accumulation_steps": auto, "gradient_clipping": auto}


class TorchUpdate(LocalGradients):
    """torch AdamW on `.grad`; with several ranks each gradient is averaged over ranks after the last micro-batch.

    bf16 weights get fp32 master copies, which AdamW steps and the model receives rounded: stepping bf16 weights
    directly loses every update below bf16's resolution (2^-8 of the weight; at lr 3e-6 almost all of them).
    A gradient written whole (GR's g1 + gamma * correction) goes to the master copies' fp32 `.grad`: stored in the
    bf16 `.grad` it would lose every part of the correction below half a bf16 step of g1 (at gamma 1e-3, most of it).
    fp16 would also need loss scaling: it is refused here and runs under DeepSpeed.
    """

    def __init__(self, model: torch.nn.Module, s: "GRPOSettings", dist: Dist):
        super().__init__(model)
        self.dist, self.max_grad_norm = dist, s.max_grad_norm
        self.params = list(model.parameters())
        if any(p.dtype == torch.float16 for p in self.params):
            raise ConfigError("model.dtype float16 needs loss scaling: set grpo.backend: deepspeed (or use bfloat16)")
        low = any(p.dtype == torch.bfloat16 for p in self.params)
        self.master = [p.detach().float().clone() for p in self.params] if low else None
        self.written = False  # the gradient was written to the master copies (not accumulated in the model's .grad)
        self.optimizer = torch.optim.AdamW(self.master or self.params, lr=s.lr, weight_decay=s.weight_decay)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()
        if boundary:
            self._average_over_ranks()

    def _holders(self) -> list[torch.Tensor]:
        return self.master if self.written else self.params

    def _average_over_ranks(self) -> None:
        if self.dist.enabled:
            # One all-reduce per tensor: simple and exact; DeepSpeedUpdate is the bucketed, sharded path.
            for p in self._holders():
                if p.grad is not None:
                    td.all_reduce(p.grad)
                    p.grad.div_(self.dist.world_size)

    def close(self) -> None:
        """Nothing to release (DeepSpeedUpdate.close)."""

    def zero(self) -> None:
        super().zero()
        if self.master is not None:
            for m in self.master:
                m.grad = None
        self.written = False

    def current(self, params):
        if not self.written:
            yield from super().current(params)
            return
        index = {id(p): i for i, p in enumerate(self.params)}
        for p in params:
            yield self.master[index[id(p)]].grad.detach()

    def write(self, params, grads):
        if self.master is None:
            return super().write(params, grads)
        index = {id(p): i for i, p in enumerate(self.params)}
        for p, g in zip(params, grads):
            self.master[index[id(p)]].grad = g.detach().float().clone()
            p.grad = None
        self.written = True

    def master_weights(self, params):
        if self.master is None:
            return None
        index = {id(p): i for i, p in enumerate(self.params)}
        return (self.master[index[id(p)]] for p in params)

    def combine(self, params, fn):
        if self.master is None:
            return super().combine(params, fn)
        # read where the gradient is now (the model's bf16 .grad, or the master copies' once written), write whole
        # to the master copies' fp32 .grad, freeing the model's as each is replaced
        index, was_written = {id(p): i for i, p in enumerate(self.params)}, self.written
        for i, p in enumerate(params):
            m = self.master[index[id(p)]]
            source = m.grad if was_written else p.grad
            m.grad = fn(i, torch.zeros_like(m) if source is None else source.detach()).float()
            p.grad = None
        self.written = True

    def mean_over_ranks(self, tensors):
        return self.dist.mean_tensors(tensors)

    def write_rank_average(self, params, grads):
        self.write(params, grads)
        self._average_over_ranks()

    def step(self) -> float:
        if self.master is None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).item()
            self.optimizer.step()
            return norm
        if not self.written:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.master, self.max_grad_norm).item()
        self.optimizer.step()
        self._master_to_model()
        self.written = False
        return norm

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """The master weights become the model's bf16 weights (the GR authors' refresh, see DeepSpeedUpdate)."""
        for m, p in zip(self.master, self.params):
            m.copy_(p)

    @torch.no_grad()
    def set_weights(self, values: list[torch.Tensor]) -> None:
        """The weights become `values` (float32, in parameter order): the master copies exactly, the model rounded."""
        for target, v in zip(self.master or self.params, values, strict=True):
            target.copy_(v)
        if self.master is not None:
            self._master_to_model()

    @torch.no_grad()
    def _master_to_model(self) -> None:
        for m, p in zip(self.master, self.params):
            p.copy_(m)

    def save(self, folder: Path) -> None:
        if self.dist.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "master": self.master}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.master is not None:
            for m, saved in zip(self.master, state["master"]):
                m.copy_(saved)
            self._master_to_model()


class DeepSpeedUpdate:
    """DeepSpeed ZeRO with the same AdamW, clipping (gradient_clipping) and precision as the model."""

    def __init__(self, model: torch.nn.Module, s: "GRPOSettings", dist: Dist):
        import deepspeed  # lazy: only the GPU environment needs it

        self.dist = dist
        skip_cpu_shm_build(dist.device)
        if not td.is_initialized():  # one process without torchrun: DeepSpeed still needs a (one-rank) group
            as_one_rank()
            init_process_group("nccl" if dist.device.type == "cuda" else "gloo")
        # DeepSpeed's communication layer wraps the existing group (and destroy_process_group releases what it caches)
        deepspeed.init_distributed(dist_backend=td.get_backend(), auto_mpi_discovery=False)
        dtype = next(model.parameters()).dtype
        config = {
            # The micro-batching is ours (grpo.micro_batch_size); the engine sees one sample per "micro-batch"
            # and is told where the accumulation boundary is.
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": s.max_grad_norm,
            "zero_optimization": {"stage": s.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
            # Gradients accumulate and are kept in fp32 beside bf16 weights (DeepSpeed keeps them in the weights'
            # dtype by default): GR writes g1 + gamma * correction whole, and in bf16 every part of the correction
            # below half a bf16 step of g1 would round away (at gamma 1e-3, most of it).
            **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == torch.bfloat16 else {}),
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        self.model = self.engine.module

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)  # reduce-scatter after the last micro-batch
        self.engine.backward(loss, scale_wrt_gas=False)  # our loss is already normalised

    def zero(self) -> None:
        self.engine.zero_grad()

    def mean_over_ranks(self, tensors):
        return self.dist.mean_tensors(tensors)

    def write_rank_average(self, params, grads):
        """The rank average of each rank's `grads`, averaged in fp32 tensor by tensor in place (no further full copy),
        then written like any full gradient. (Handing them to the engine as the backward of sum <p, g> would take g
        in the weights' dtype: in bf16 that rounds GR's correction away, as a bf16 gradient buffer does.)"""
        if self.dist.enabled:
            for g in grads:
                td.all_reduce(g)
                g.div_(self.dist.world_size)
        # The engine keeps its gradient partitions only between a backward and its step: the backward of a zero
        # surrogate makes them (zeros, no rounding), then the fp32 values are written into them.
        self.engine.zero_grad()
        self.backward(sum(torch.sum(p * 0.0, dtype=torch.float32) for p in params), boundary=True)
        self.write(params, grads)

    def refresh_master_weights(self) -> None:
        """Copy the bf16/fp16 module weights into the optimizer's fp32 master weights (DeepSpeed's
        refresh_fp32_params): what the GR authors' code does after perturbing and after restoring."""
        self.engine.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def set_weights(self, values: list[torch.Tensor]) -> None:
        """The weights become `values` (float32, in parameter order): each rank's fp32 master partition exactly
        (DeepSpeed's tensor-fragment API), the module's weights rounded to their dtype."""
        from deepspeed.utils import safe_set_full_fp32_param  # lazy: only the DeepSpeed backend needs it
        for p, v in zip(self.model.parameters(), values, strict=True):
            safe_set_full_fp32_param(p, v)
            p.copy_(v)

    def current(self, params):
        from deepspeed.utils import safe_get_full_grad  # all-gathers the partitions: the full averaged gradient
        for p in params:  # one parameter's full gradient at a time
            g = safe_get_full_grad(p)
            yield torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach()

    def read(self, params):
        return [g.clone() for g in self.current(params)]

    def write(self, params, grads):
        from deepspeed.utils import safe_set_full_grad  # each rank keeps only its partition of the value
        for p, g in zip(params, grads):
            safe_set_full_grad(p, g.float())

    def master_weights(self, params):
        """The optimizer's fp32 master copy of each parameter, gathered one at a time; None in fp32, where the optimizer
        steps the model's own weights (no copy apart from them)."""
        if next(self.model.parameters()).dtype not in (torch.bfloat16, torch.float16):
            return None
        from deepspeed.utils import safe_get_full_fp32_param  # lazy: only the DeepSpeed backend needs it
        return (safe_get_full_fp32_param(p) for p in params)

    def combine(self, params, fn):
        """Parameter by parameter (each gathered, transformed and written back as its partitions): no full copy."""
        for i, (p, g) in enumerate(zip(params, self.current(params))):
            self.write([p], [fn(i, g)])

    def step(self) -> float:
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="latest", save_latest=False)  # every rank

    def close(self) -> None:
        """Remove the engine's gradient hooks. DeepSpeed stores its process group on every parameter and registers
        hooks on their gradient accumulators; the hooks live in C++, where Python's garbage collector cannot see them,
        so without this the model, the engine and the group stay alive to interpreter shutdown (WORLD_GROUP_DEFAULTS
        says why that matters)."""
        self.engine.destroy()

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="latest", load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder / 'deepspeed'}")


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


Update = TorchUpdate | DeepSpeedUpdate  # what GRPO's step updates the policy through (grpo.backend names which)


def make_update(model: torch.nn.Module, s: "GRPOSettings", dist: Dist) -> Update:
    """grpo.backend: 'auto' uses DeepSpeed on CUDA (when installed) and torch AdamW otherwise."""
    if s.gr_gamma and s.gr_refresh_master_weights and \
            next(model.parameters()).dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError("grpo.gr_refresh_master_weights copies bf16 weights into the fp32 master weights (the GR "
                          "authors' code): it needs model.dtype bfloat16 (float32 weights have no master copy)")
    return DeepSpeedUpdate(model, s, dist) if use_deepspeed(s.backend, dist.device) else TorchUpdate(model, s, dist)
