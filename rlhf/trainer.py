"""The Dr.GRPO trainer (Liu et al. 2025, the base optimizer of both papers): one update step, the run it acts on,
checkpoints. The grpo stage (rlhf/stages/grpo.py) drives it; `make bench` times it.

Each step: B prompts -> G completions each -> reward (the proxy RM, or an RLVR experiment's verifiable reward) ->
group-mean advantages -> per-token loss summed
over tokens / (B*G*T_max) (+ beta * k3 KL to a reference) -> clip the gradient norm -> AdamW step.

The regularizers are local additions, each switched on by its config field and combinable:
  kl_beta              KL penalty to pi_ref (pi_init, or the current policy after each reset)
  reset_every          Reference Resets: pi_ref <- pi_phi after updates R, 2R, ...
  kl_beta_decay_every  scheduled-beta ablation: beta / i in iteration i, pi_ref fixed
  elastic_reset_every  Elastic Reset (baseline): policy <- its EMA, then EMA <- pi_init, after updates N, 2N, ...
  gr_gamma             gradient regularization: a finite difference (second pass on the same rollouts) or the
                       exact Hessian-vector product (gr_estimator: hvp)
  signcert_quantile    SignCert-PO: each advantage replaced by its worst case within the proxy RM's certified radius
The checkpoint (policy, pi_ref after resets, optimizer, every RNG stream) makes a run resumable bit for bit.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.gr import finite_difference_gr, hvp_gr
from rlhf.algorithms.losses import dr_grpo_loss
from rlhf.algorithms.resets import ema_update, float32_copy, is_reset_step, reset_reference, scheduled_beta
from rlhf.algorithms.signcert import signcert
from rlhf.diagnostics import signcert_stats
from rlhf.distributed import Dist, Update, make_update, shared_atomic_dir
from rlhf.generation import sample
from rlhf.io import read_jsonl
from rlhf.models import load_causal_lm, tokenizer_of
from rlhf.policy import token_logprobs
from rlhf.rewards.kinds import RewardContext, reward_kind
from rlhf.rewards.verifiable import StepRewards
from rlhf.rng import PromptSampler
from rlhf.settings import TRAJECTORY_NEUTRAL, GRPOSettings


def grpo_step(update: Update, dist: Dist, rollout, scores, ref_logprobs, kl_beta: float, settings: GRPOSettings) -> dict:
    """One Dr.GRPO update on this rank's rollouts (its share of the global batch); the step's statistics."""
    G = settings.group_size
    # Group means and SignCert's quantile are over the global batch: every rank's rewards and features.
    rewards = dist.gather(scores.rewards)
    t_advantages = time.perf_counter()  # after the gather: waiting for the slowest rank's scoring is not this work
    advantages = dr_grpo_advantages(rewards, G)
    # 0 when every group's rewards tie (the policy gets no gradient from the reward): the rehearsal's hollow-path check
    stats = {"advantage/nonzero_fraction": (advantages != 0).float().mean().item()}
    if settings.signcert_quantile is not None:
        # SignCert-PO: each advantage replaced by its worst case under a head change of size eps.
        cert = signcert(advantages, dist.gather(scores.features), G, settings.signcert_quantile,
                        epsilon_from=settings.signcert_epsilon_from, quantile_over=settings.signcert_quantile_over,
                        clip_negative=settings.signcert_clip_negative)
        stats.update(signcert_stats(cert, rewards, G))
        advantages = cert.rho * advantages
    # the advantages' own seconds (SignCert's worst case and its statistics included): make bench attributes
    # SignCert's cost with it, free of the other steps' work, which differs as the two policies drift apart
    stats["time/advantages"] = time.perf_counter() - t_advantages
    policy = update.model
    device = next(policy.parameters()).device
    n = rollout.completion_mask.shape[0]
    size = settings.micro_batch_size or n
    chunks = [slice(i, i + size) for i in range(0, n, size)]
    skipped = zero_gradient_chunks(advantages.view(-1, n), chunks, kl_beta) if settings.skip_zero_advantage else set()
    stats["update/skipped_fraction"] = len(skipped) / len(chunks)
    advantages, mask = dist.local(advantages).to(device), rollout.completion_mask.to(device).float()
    at_phi = {}  # per micro-batch: log-probs and entropy sum of the unperturbed policy (the step's statistics)

    def micro_loss(i: int, rows: slice, old_logprobs=None, exp_ratio: bool = False, at_phi_pass: bool = True
                   ) -> torch.Tensor:
        """Micro-batch i's loss weighted by its share of the batch, so the accumulated gradient is the whole
        batch's (averaged over ranks by the update backend). old_logprobs=None: the on-policy ratio 1;
        exp_ratio: exp(p - p.detach()), whose second derivative holds the authors' second-pass ratio term;
        at_phi_pass: the pass at the unperturbed weights, whose log-probs and entropy are kept."""
        part = rollout.rows(rows)
        logprobs, entropy = token_logprobs(policy, part, with_entropy=True)
        m = mask[rows]
        old = logprobs.detach() if exp_ratio and old_logprobs is None else old_logprobs
        loss = dr_grpo_loss(logprobs, old, advantages[rows], m, settings.max_new_tokens, settings.clip_eps,
                            None if ref_logprobs is None else ref_logprobs[rows], kl_beta) * (m.shape[0] / n)
        if at_phi_pass:
            at_phi[i] = (logprobs.detach(), (entropy.detach() * m).sum().item())
        return loss

    with torch.no_grad():  # a skipped micro-batch's statistics at phi, without a graph
        for i in skipped:
            micro_loss(i, chunks[i])
    stored_ratio = settings.gr_second_pass_ratio == "stored"

    def gradient_pass(perturbed: bool = False) -> float:
        """Forward and backward over the micro-batches, at phi or (GR's finite difference) at the perturbed phi',
        where the authors' code (gr_second_pass_ratio: stored) takes the ratio against the log-probs stored at phi."""
        loss = 0.0
        for i, rows in enumerate(chunks):
            if i in skipped:  # its gradient is exactly zero (and its loss 0) at phi and at phi'
                continue
            part_loss = micro_loss(i, rows, at_phi[i][0] if perturbed and stored_ratio else None,
                                   at_phi_pass=not perturbed)
            update.backward(part_loss, boundary=i == len(chunks) - 1)
            loss += part_loss.item()
        return loss

    if settings.gr_gamma > 0:
        # GR: the gradient of L + (gamma/2)||grad L||^2 on the transformer blocks (rlhf/algorithms/gr.py).
        common = dict(gamma=settings.gr_gamma, g1_clip=settings.gr_g1_clip, excluded_grad=settings.gr_excluded_grad, grads=update)
        if settings.gr_estimator == "hvp":
            gr = hvp_gr(policy, [functools.partial(micro_loss, i, rows, exp_ratio=stored_ratio)
                                 for i, rows in enumerate(chunks) if i not in skipped], **common)
        else:
            gr = finite_difference_gr(policy, gradient_pass, eps=settings.gr_eps, g2_clip=settings.gr_g2_clip,
                                      on_weights_changed=update.refresh_master_weights
                                      if settings.gr_refresh_master_weights else None, **common)
            stats.update({"g2_norm": gr.g2_norm, "gr/realized_perturbation": gr.realized_perturbation,
                          "gr/perturbation_error": gr.perturbation_error, "gr/changed_fraction": gr.changed_fraction})
        stats.update({"g1_norm": gr.g1_norm, "loss": gr.loss, "gr/curvature": gr.curvature})
    else:
        update.zero()
        stats["loss"] = gradient_pass()
    grad_norm = update.step()  # clips to max_grad_norm, then AdamW
    stats.setdefault("g1_norm", grad_norm)  # without GR the final gradient is g1
    entropy = sum(at_phi[i][1] for i in range(len(chunks))) / mask.sum().item()
    logprobs = torch.cat([at_phi[i][0] for i in range(len(chunks))])
    return {**stats, "grad_norm": grad_norm, "entropy": entropy, "logprobs": logprobs}


def zero_gradient_chunks(advantages: torch.Tensor, chunks: list[slice], kl_beta: float) -> set[int]:
    """The micro-batches (indices into `chunks`, one rank's rows) whose backward can be skipped: those whose
    advantages are zero on every rank (`advantages`: [ranks, rows per rank], the gathered batch) when no KL penalty
    adds a gradient of its own. Their loss is 0 * ratio: its gradient, its Hessian-vector product and its value are
    exactly zero, so the accumulated gradient is bit for bit the one without them. On RLVR tasks most early groups
    tie (every completion wrong, or every one right) and such micro-batches are the common case.

    Every rank computes the same set from the same gathered advantages, so their backward calls (each a collective
    under DeepSpeed) stay matched. The last micro-batch is never skipped: it carries the accumulation boundary (the
    reduction over ranks) and makes every gradient exist, so the optimizer steps as it would (AdamW moves the
    weights on a zero gradient too: its momentum and weight decay)."""
    if kl_beta:
        return set()
    zero = advantages == 0
    return {i for i, rows in enumerate(chunks[:-1]) if bool(zero[:, rows].all())}


@dataclass
class GRPORun:
    policy: torch.nn.Module      # the trained model (the DeepSpeed engine's module under DeepSpeed)
    initial: torch.nn.Module     # pi_init, frozen
    reference: torch.nn.Module   # pi_ref: pi_init itself, or its own copy when reset
    reward: object               # the method's reward kind, loaded (rlhf/rewards/kinds.py)
    tokenizer: object
    update: Update               # the update backend (grpo.backend: torch or deepspeed; rlhf/distributed.py)
    dist: Dist
    settings: GRPOSettings
    prompts: PromptSampler       # which training prompts each step draws (its own checkpointed RNG)
    vllm: object | None = None   # VLLMSampler when grpo.generation is vllm
    ema: list | None = None      # Elastic Reset: float32 EMA of the policy's parameters

    def __enter__(self) -> "GRPORun":
        return self

    def __exit__(self, *exc) -> None:
        close_run(self)

    def generate(self, prompts: list[str]):
        """G completions per prompt from the current policy (HF generate, or vLLM with the weights pushed first)."""
        settings = self.settings
        if self.vllm is not None:
            self.vllm.load_weights(self.policy)
            return self.vllm(prompts, settings.group_size, settings.max_new_tokens, settings.temperature)
        return sample(self.policy, self.tokenizer, prompts, settings.group_size, settings.max_new_tokens, settings.temperature,
                      batch_size=len(prompts) * settings.group_size)


def load_run(cfg: dict, settings: GRPOSettings, train: Path, sft: Path, reward_inputs: dict[str, list[Path]], device,
             dist: Dist | None = None, seed: int | None = None) -> GRPORun:
    """The SFT policy (trained), pi_init and pi_ref (frozen), the reward (the method's kind, rlhf/rewards/kinds.py,
    loaded from its declared inputs `reward_inputs`), the update backend and the training prompts (file train)."""
    dist = dist or Dist(device=device)
    rows = read_jsonl(train, required=("prompt",))
    prompts = PromptSampler([r["prompt"] for r in rows], cfg["seed"] if seed is None else seed)
    tokenizer = tokenizer_of(sft, cfg)
    policy = load_causal_lm(sft, cfg["model"]["dtype"], device)
    initial = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_init: KL reference and KL-from-init metric
    # Reference Resets need their own pi_ref; otherwise pi_ref is pi_init (shared, one forward pass for both).
    reference = copy.deepcopy(initial) if settings.reset_every else initial
    reward = reward_kind(settings.reward).load(RewardContext(cfg, settings, tokenizer, device, dist, rows,
                                                             reward_inputs))
    update = make_update(policy, settings, dist)
    vllm = None
    if settings.generation == "vllm":
        from rlhf.generation_vllm import VLLMSampler  # lazy: only this path needs vLLM installed
        vllm = VLLMSampler(sft, tokenizer, dtype=cfg["model"]["dtype"], max_model_len=settings.vllm_max_model_len,
                           gpu_memory_utilization=settings.vllm_gpu_memory_utilization, seed=torch.initial_seed() % 2 ** 31,
                           sleep_between_steps=settings.vllm_sleep, kv_cache_gib=settings.vllm_kv_cache_gib,
                           enforce_eager=settings.vllm_enforce_eager)
    ema = float32_copy(initial.parameters()) if settings.elastic_reset_every else None
    return GRPORun(update.model, initial, reference, reward, tokenizer, update, dist, settings, prompts, vllm=vllm,
                   ema=ema)


def train_step(run: GRPORun, batch: list[str], step: int) -> dict:
    """Update `step` (1-based): sample G completions for each of this rank's prompts of `batch`, score them (proxy
    RM or verifiable reward), update once; the step's metrics, averaged over ranks."""
    settings, G = run.settings, run.settings.group_size
    batch = run.dist.shard(batch)
    t0 = time.perf_counter()
    rollout = run.generate(batch)
    t1 = time.perf_counter()
    scores = run.reward([p for p in batch for _ in range(G)], rollout.texts)  # rewards (and RM features or terms)
    t2 = time.perf_counter()
    kl_beta = scheduled_beta(settings.kl_beta, step, settings.kl_beta_decay_every)
    penalty_uses_init = kl_beta > 0 and run.reference is run.initial
    with torch.no_grad():  # pi_init log-probs serve the KL-from-init metric and, when pi_ref is pi_init, the penalty
        init_logprobs = None
        if penalty_uses_init or step % settings.kl_metric_every == 0:
            init_logprobs = token_logprobs(run.initial, rollout)
        ref_logprobs = None
        if kl_beta > 0:
            ref_logprobs = init_logprobs if penalty_uses_init else token_logprobs(run.reference, rollout)
    run.policy.train()
    stats = grpo_step(run.update, run.dist, rollout, scores, ref_logprobs, kl_beta, settings)
    t3 = time.perf_counter()
    logprobs = stats.pop("logprobs")
    if rollout.sampler_logprobs is not None:  # vLLM's log-probs against the trainer's, on the same tokens
        stats["generation/logprob_gap"] = logprob_gap(rollout.sampler_logprobs, logprobs.detach().cpu(),
                                                      rollout.completion_mask)
    if init_logprobs is not None:
        stats["kl"] = ((logprobs - init_logprobs) * rollout.completion_mask.to(logprobs.device)).sum(1).mean().item()
    if is_reset_step(step, settings.reset_every):
        reset_reference(run.reference, run.policy)
        stats["reference_reset"] = 1
    if run.ema is not None:
        elastic_reset(run, step, stats)
    if run.dist.device.type == "cuda":  # the job's high-water mark so far (weights, optimizer, activations, vLLM)
        stats["memory/peak_gib"] = torch.cuda.max_memory_allocated(run.dist.device) / 2 ** 30
    if settings.rollouts_every and step % settings.rollouts_every == 0:  # every rank's, on rank 0 (None elsewhere)
        rows = [{"prompt": p, "completion": t, "reward": float(r)} for p, t, r in
                zip([p for p in batch for _ in range(G)], rollout.texts, scores.rewards.tolist())]
        gathered = run.dist.gather_objects(rows)
        stats["rollout"] = None if gathered is None else [row for part in gathered for row in part]
    return run.dist.mean({**reward_stats(scores), "kl_beta": kl_beta,
                          "length": rollout.lengths.float().mean().item(), **stats,
                          "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
                          "time/step": time.perf_counter() - t0})


def elastic_reset(run: GRPORun, step: int, stats: dict) -> None:
    """Elastic Reset after update `step`: the EMA follows the policy; at multiples of N the policy becomes the EMA
    (optimizer moments kept), then the EMA becomes pi_init."""
    settings = run.settings
    ema_update(run.ema, run.policy.parameters(), settings.elastic_reset_decay)
    if is_reset_step(step, settings.elastic_reset_every):
        run.update.set_weights(run.ema)
        run.ema = float32_copy(run.initial.parameters())
        stats["elastic_reset"] = 1


def reward_stats(scores) -> dict:
    """The step's reward metrics: the proxy RM's mean, or the verifiable reward's mean, each term's mean and the
    fraction of judge replies without a usable score."""
    if not isinstance(scores, StepRewards):
        unsupported = getattr(scores, "unsupported", None)  # BSPO's support test
        bspo = {} if unsupported is None else {"bspo/unsupported_fraction": unsupported.float().mean().item()}
        return {"proxy_reward": scores.rewards.mean().item(), **bspo}
    return {"reward": scores.rewards.mean().item(), **{f"reward/{k}": v for k, v in scores.terms.items()},
            "judge/unparseable_fraction": scores.unparseable / len(scores.rewards)}


def logprob_gap(sampler: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |sampler − trainer| log-prob over the completion tokens both know (bf16 engines drift: worth watching)."""
    known = mask.bool() & ~sampler.isnan()
    return (sampler.float() - trainer.float()).abs()[known].mean().item() if known.any() else float("nan")


def perturbation_lost(stats: dict) -> bool:
    """GR's finite difference measured rounding: the stored phi' kept under half of eps*g1, or is off by over half."""
    return stats.get("gr/realized_perturbation", 1.0) < 0.5 or stats.get("gr/perturbation_error", 0.0) > 0.5


def rounding_warning(stats: dict, dtype: str) -> str:
    return (f"grpo: warning: GR's perturbation phi + eps*g1 stored in {dtype} has {stats['gr/realized_perturbation']:.2f} "
            f"of its size and a relative error of {stats['gr/perturbation_error']:.2f} ({stats['gr/changed_fraction']:.2%} "
            "of the elements changed), so the finite difference measures rounding, not H*g: set grpo.gr_estimator: hvp "
            "(exact at any precision)")


SMALL_FILE = 10 * 2 ** 20


def _file_stamp(path: Path):
    """Small files by content; weight files by size and modification time (hashing an 8B model costs minutes)."""
    stat = path.stat()
    if stat.st_size <= SMALL_FILE:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return [stat.st_size, stat.st_mtime_ns]


def fingerprint(cfg: dict, settings: GRPOSettings, seed: int, prompts_file: Path, folders: list[Path]) -> str:
    """Identifies what determines a run's trajectory (the training prompts, the SFT policy and its tokenizer, the
    proxy RM (and UWO's members, AdvPO's matrix), the seed, precision and the trajectory-shaping settings), so a rerun
    from other inputs starts afresh."""
    stamp = {"settings": {k: v for k, v in settings.as_dict().items() if k not in TRAJECTORY_NEUTRAL}, "seed": seed,
             "dtype": cfg["model"]["dtype"], "prompts": _file_stamp(prompts_file), "rlvr": cfg.get("rlvr"),
             "inputs": {folder.name: _file_stamp(folder) if folder.is_file() else  # a file input: AdvPO's M_D^-1
                        {f.name: _file_stamp(f) for f in sorted(folder.iterdir())
                         if f.is_file() and f.name != "train_log.jsonl"} for folder in folders}}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, run: GRPORun, step: int, stamp: str) -> None:
    """Collective: every rank writes its RNG state (and, under DeepSpeed, its optimizer partition) into the
    folder rank 0 renames into place once all have finished."""
    dist = run.dist
    with shared_atomic_dir(dist, path) as out:
        run.update.save(out)
        torch.save({"python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),  # HF generate's streams
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "prompt_rng": run.prompts.state()}, out / f"rng{dist.rank}.pt")
        if dist.is_main:
            run.policy.save_pretrained(out)
            if run.settings.reset_every:  # after Reference Resets pi_ref is neither pi_init nor pi_phi
                run.reference.save_pretrained(out / "reference")
            if run.ema is not None:  # Elastic Reset's float32 EMA
                torch.save([e.cpu() for e in run.ema], out / "ema.pt")
            torch.save({"step": step, "fingerprint": stamp, "world_size": dist.world_size}, out / "trainer_state.pt")


def load_checkpoint(path: Path, run: GRPORun, stamp: str) -> int:
    """Restore a matching checkpoint and return its step (0 when there is none or it is stale)."""
    dist, state_file = run.dist, path / "trainer_state.pt"
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, weights_only=False)
    if state["fingerprint"] != stamp or state.get("world_size") != dist.world_size:
        dist.barrier()  # every rank has read it before rank 0 removes it
        if dist.is_main:
            print(f"grpo: ignoring checkpoint {path}: trained from other inputs, settings or number of ranks")
            shutil.rmtree(path)
        return 0
    # from_pretrained re-ties shared embeddings that save_pretrained stored once; then a strict copy.
    reference = run.reference if run.settings.reset_every else None
    for module, folder in ((run.policy, path), (reference, path / "reference")):
        if module is not None:
            saved = type(module).from_pretrained(folder, dtype=next(module.parameters()).dtype)
            module.load_state_dict(saved.state_dict())
    run.update.load(path)
    if run.ema is not None:
        for e, saved in zip(run.ema, torch.load(path / "ema.pt"), strict=True):
            e.copy_(saved)
    rng = torch.load(path / f"rng{dist.rank}.pt", weights_only=False)
    random.setstate(rng["python_rng"])
    run.prompts.restore(rng["prompt_rng"])
    torch.set_rng_state(rng["torch_rng"])
    if rng.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    if dist.is_main:
        print(f"grpo: resumed from step {state['step']} ({path})")
    return state["step"]


def close_run(run: GRPORun) -> None:
    """Stop what the run started beside the trainer (the vLLM engine, what the reward started) and release the update
    backend's hold on the process group."""
    run.update.close()
    if run.vllm is not None:
        run.vllm.close()
    if hasattr(run.reward, "close"):  # e.g. the RLVR miniature's stand-in judge, served while the run lives
        run.reward.close()
