"""The data-parallel GRPO step equals the single-process one (rlhf/distributed.py).

Each case runs real processes joined by a gloo process group, as torchrun would start them, with the update
backend the GPU runs use (DeepSpeed ZeRO-2) and the plain torch one. Every rank holds its share of one batch of
rollouts; the gradient handed to the optimizer (GR's finite difference, SignCert weights, KL penalty, micro-batches)
and the updated weights must equal one process that sees the whole batch.
"""
from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlhf.cli import group_threads
from rlhf.distributed import Dist, deepspeed_available, free_port, make_update
from rlhf.generation import sample
from rlhf.policy import token_logprobs
from rlhf.rewards.proxy_rm import Scores
from tests.conftest import build_tiny, record_applied_gradient

needs_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="deepspeed is not installed")

PROMPTS = ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :",
           "post : carol found the dog . tldr :", "post : dave lost the key . tldr :"]
G, T_MAX = 4, 6
SETTINGS = dict(group_size=G, max_new_tokens=T_MAX, clip_eps=0.2, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5,
                gr_gamma=0.1, gr_eps=1e-3, gr_g1_clip=10.0, gr_g2_clip=10.0, gr_excluded_grad="g1",
                gr_estimator="finite_difference", gr_second_pass_ratio="one", gr_refresh_master_weights=False,
                signcert_quantile=0.3, signcert_epsilon_from="radius", signcert_quantile_over="nonzero",
                signcert_clip_negative=False,
                micro_batch_size=0, backend="torch", zero_stage=2)


def _problem(tied: tuple[int, ...] = ()):
    """The same policy, reference, rollouts and RM outputs in every process (seeded, CPU); the groups in `tied`
    rewarded alike (zero advantages)."""
    model, tok = build_tiny()
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference unlike the policy, so the KL penalty has a gradient
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    torch.manual_seed(1)
    rollout = sample(model, tok, PROMPTS, G, T_MAX, 1.0)
    gen = torch.Generator().manual_seed(2)
    scores = Scores(torch.randn(len(PROMPTS) * G, generator=gen), torch.randn(len(PROMPTS) * G, 8, generator=gen))
    for k in tied:
        scores.rewards[k * G:(k + 1) * G] = 0.5
    return model, reference, rollout, scores


def one_step(dist: Dist, settings: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """One grpo_step on this rank's rows; (gradient given to the optimizer, weights after the step, stats)."""
    from rlhf.trainer import grpo_step
    from tests.conftest import micro_grpo
    settings = dict(settings)
    kl_beta, tied = settings.pop("kl_beta", 0.05), settings.pop("tied", ())
    settings = micro_grpo(**settings)
    model, reference, rollout, scores = _problem(tied)
    k = rollout.completion_ids.shape[0] // dist.world_size
    rows = slice(dist.rank * k, (dist.rank + 1) * k)
    rollout, scores = rollout.rows(rows), Scores(scores.rewards[rows], scores.features[rows])
    ref_logprobs = token_logprobs(reference, rollout).detach()
    update = make_update(model, settings, dist)
    params = [p for p in update.model.parameters() if p.requires_grad]
    seen = record_applied_gradient(update)
    stats = grpo_step(update, dist, rollout, scores, ref_logprobs, kl_beta, settings)
    stats.pop("logprobs")
    result = seen["grad"], [p.detach().clone() for p in params], dist.mean(stats)
    update.close()
    return result


def _worker(rank: int, world_size: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist = Dist.from_env(torch.device("cpu"))
    result = one_step(dist, settings)
    if rank == 0:
        torch.save(result, out)
    dist.close()
    gc.collect()  # as rlhf.cli does after a stage
    # the group is gone, not just unregistered: its threads would otherwise meet interpreter shutdown
    left = group_threads()
    assert not left, f"rank {rank}: the process group outlives Dist.close(): {left}"


# The ranks fork from the forkserver that imported this module (torch, the trainer, DeepSpeed) once (tests/conftest.py):
# spawned, each rank imported them itself, ~5 s of CPU per rank and ~70 s over this file's cases.
def run_ranks(world_size: int, settings: dict, tmp_path):
    out = str(tmp_path / f"rank0-{world_size}-{settings['backend']}.pt")
    mp.start_processes(_worker, args=(world_size, free_port(), settings, out), nprocs=world_size, join=True,
                       start_method="forkserver")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single_process():
    torch.set_num_threads(1)
    return one_step(Dist(), SETTINGS)


def _assert_same(result, expected):
    grads, weights, stats = result
    exp_grads, exp_weights, exp_stats = expected
    scale = max(g.abs().max().item() for g in exp_grads)
    for a, b in zip(grads, exp_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    # Adam's first step is ~lr * g / (|g| + 1e-8): for entries with g ~ 1e-8 it amplifies rounding, so the
    # weights are compared where the gradient is not negligible.
    for a, b, g in zip(weights, exp_weights, exp_grads):
        keep = g.abs() > 1e-4 * scale
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-3 * SETTINGS["lr"])
    for key in ("g1_norm", "g2_norm", "gr/curvature", "grad_norm", "signcert/epsilon", "signcert/rho_negative",
                "loss", "entropy"):
        if key in exp_stats:  # the finite difference's curvature divides fp32 rounding by eps = 1e-3
            rel = 3e-3 if key == "gr/curvature" and "g2_norm" in exp_stats else 1e-4
            assert stats[key] == pytest.approx(exp_stats[key], rel=rel), key


def test_the_step_changes_the_weights_and_uses_every_regularizer(single_process):
    """Guard against a vacuous comparison: the reference step is a real GR + SignCert + KL update."""
    grads, weights, stats = single_process
    model, *_ = _problem()
    assert stats["g2_norm"] > 0 and 0 < stats["signcert/rho_negative"] < 1
    assert all(not torch.equal(a, b.detach()) for a, b in zip(weights, model.parameters()))
    assert sum(g.norm() ** 2 for g in grads) ** 0.5 > 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_torch_data_parallel_step_equals_single_process(world_size, single_process, tmp_path):
    settings = {**SETTINGS, "micro_batch_size": 3}  # micro-batches that cut across groups
    _assert_same(run_ranks(world_size, settings, tmp_path), single_process)


@needs_deepspeed
@pytest.mark.parametrize("world_size", [1, 2])
def test_deepspeed_zero2_step_equals_single_process(world_size, single_process, tmp_path):
    """GR exact under ZeRO-2's partitioned gradients; SignCert's quantile and group means global."""
    settings = {**SETTINGS, "backend": "deepspeed", "micro_batch_size": 5}
    _assert_same(run_ranks(world_size, settings, tmp_path), single_process)



TIED = {**SETTINGS, "kl_beta": 0.0, "tied": (0, 2, 3), "micro_batch_size": 2}


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_zero_advantage_micro_batches_are_skipped_alike_on_every_rank(backend, tmp_path):
    """grpo.skip_zero_advantage on 2 ranks (GR's two passes, SignCert): each rank's micro-batches 0 and 1 hold a tied
    group, so both ranks skip them (matching collectives: the run finishes); rank 1's 2 and 3 are tied too but rank
    0's are not, so they run. The update is the single process's that skips nothing."""
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    torch.set_num_threads(1)
    expected = one_step(Dist(), {**TIED, "skip_zero_advantage": False})
    assert expected[2]["update/skipped_fraction"] == 0
    result = run_ranks(2, {**TIED, "backend": backend}, tmp_path)
    assert result[2]["update/skipped_fraction"] == 2 / 4
    _assert_same(result, expected)


@pytest.fixture(scope="module")
def single_process_hvp():
    torch.set_num_threads(1)
    return one_step(Dist(), {**SETTINGS, "gr_estimator": "hvp"})


@pytest.mark.parametrize("backend,micro_batch_size", [("torch", 3), ("deepspeed", 0), ("deepspeed", 5)])
def test_hvp_gr_on_two_ranks_equals_single_process(backend, micro_batch_size, single_process_hvp, tmp_path):
    """GR's exact estimator under data parallelism: g1 averaged over ranks before H g1, each rank's H g1 through
    the backend's own reduction (ZeRO-2: partitioned); with one micro-batch per rank (graph kept) or several."""
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    _, _, stats = single_process_hvp
    assert stats["gr/curvature"] != 0 and "g2_norm" not in stats
    settings = {**SETTINGS, "gr_estimator": "hvp", "backend": backend, "micro_batch_size": micro_batch_size}
    _assert_same(run_ranks(2, settings, tmp_path), single_process_hvp)


def test_the_process_group_is_released_when_modules_holding_it_load_after_it():
    """A fresh rank (not this file's preloaded forkserver) joins the group before a stage imports DeepSpeed and
    torch.distributed.nn, whose functions take the world group as a default argument: Dist.close() must still free
    the group and stop its threads (a rank kept them alive to shutdown and once aborted there, after its work)."""
    code = ("import gc, torch\n"
            "from rlhf.distributed import Dist\n"
            "dist = Dist.from_env(torch.device('cpu'))\n"
            "import torch.distributed.nn.functional\n"
            "try:\n    import deepspeed.comm.torch\nexcept ImportError:\n    pass\n"
            "from rlhf.cli import group_threads\n"
            "alive = group_threads()\n"
            "dist.close(); gc.collect()\n"
            "print(len(alive), len(group_threads()))\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before > 0 and after == 0  # the check sees the threads while the group lives


# The stage itself: launched as the Snakefile launches it, and resumed under DeepSpeed.

def test_grpo_stage_under_torchrun_with_two_ranks(micro_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m rlhf grpo`: both ranks train, rank 0 alone writes the artifacts (the rollouts
    with both ranks' completions)."""
    import pandas as pd

    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    backend = "deepspeed" if deepspeed_available() else "torch"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "rlhf", "grpo", "--config", str(cfg), "--method", "gr", "--seed", "0",
                          f"grpo.backend={backend}", "grpo.micro_batch_size=3", "grpo.checkpoint_every=2",
                          "grpo.rollouts_every=4"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "outlived" not in out.stderr, out.stderr[-3000:]  # each rank's process group was freed before its exit
    assert "4 steps on 2 rank(s)" in out.stdout and out.stdout.count("grpo: gr seed 0:") == 1
    run_dir = dst / "grpo" / "gr" / "seed0"
    df = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    assert df.dropna(subset=["proxy_reward"])["step"].tolist() == [1, 2, 3, 4]  # one line per step, not per rank
    assert (df.dropna(subset=["g2_norm"])["g2_norm"] > 0).all()
    assert (run_dir / "policy" / "model.safetensors").is_file() and not (run_dir / "work").exists()
    rollouts = pd.read_json(run_dir / "rollouts.jsonl", lines=True)   # 2 prompts x 4 completions, one prompt per rank
    assert rollouts["step"].tolist() == [4] * 8 and rollouts["prompt"].nunique() == 2
    trained = df.dropna(subset=["proxy_reward"]).set_index("step")
    assert rollouts["reward"].mean() == pytest.approx(trained.loc[4, "proxy_reward"], rel=1e-5)


@needs_deepspeed
def test_grpo_stage_resumes_under_deepspeed(micro_run, tmp_path, monkeypatch, capsys):
    """One process with DeepSpeed ZeRO-2 (as on one GPU): a run killed after its step-2 checkpoint resumes
    with the partitioned optimizer state DeepSpeed saved."""
    from rlhf.cli import main
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream, _interrupt_at_step
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    args = ["grpo", "--config", str(cfg), "--method", "gr", "--seed", "0", "grpo.backend=deepspeed"]
    restore = _interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    ckpt = dst / "grpo" / "gr" / "seed0" / "work" / "checkpoint"
    assert (ckpt / "trainer_state.pt").is_file() and any((ckpt / "deepspeed").rglob("*optim_states.pt"))
    restore()
    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert (dst / "grpo" / "gr" / "seed0" / "policy" / "model.safetensors").is_file()


@needs_deepspeed
def test_sft_and_rm_trainers_run_deepspeed_zero2_under_torchrun(micro_run, tmp_path):
    """The SFT and RM stages on 2 ranks through their TRL trainers with DeepSpeed ZeRO-2; batch_size stays the
    global batch, so the step count is the single-process one, and rank 0 alone writes the artifacts."""
    import json
    import shutil

    from tests.conftest import write_config
    _, root = micro_run
    dst = tmp_path / "results" / "micro"
    for part in ("data", "base", "pairs"):
        shutil.copytree(root / part, dst / part)
    cfg = write_config(tmp_path)
    for stage in ("sft", "rm"):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "rlhf", stage, "--config", str(cfg), f"{stage}.backend=deepspeed"],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "outlived" not in out.stderr, out.stderr[-3000:]  # DeepSpeed's engine released its process group
        assert "2 rank(s), DeepSpeed ZeRO-2" in out.stdout, out.stdout[-2000:]
        steps = lambda run: max(json.loads(line)["step"] for line in (run / "train_log.jsonl").open())  # noqa: E731
        assert steps(dst / stage) == steps(root / stage)
        assert (dst / stage / "model.safetensors").is_file() and not (dst / stage / "trainer").exists()
    assert json.loads((dst / "rm" / "metrics.json").read_text())["n_train"] > 0
