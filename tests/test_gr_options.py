"""GR's options in the GRPO step, each against a hand-computed gradient: the authors'-code ablations
(second-pass ratio, DeepSpeed master-weight refresh) and the warning when bf16 rounds the perturbation away."""
import copy

import pytest
import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.gr import default_perturbed_parameters
from rlhf.config import load_config
from rlhf.distributed import Dist, deepspeed_available, make_update
from rlhf.errors import ConfigError
from rlhf.generation import sample
from rlhf.policy import token_logprobs
from rlhf.rewards.proxy_rm import Scores
from rlhf.settings import GRPOSettings
from rlhf.trainer import grpo_step
from tests.conftest import micro_grpo, record_applied_gradient

G, T_MAX, GAMMA, EPS = 4, 5, 0.5, 1e-4
PROMPTS = ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"]


def settings(**overrides) -> GRPOSettings:
    """The micro config's grpo section (all fields, schema defaults) with a GR method's overrides."""
    return micro_grpo(**{"group_size": G, "max_new_tokens": T_MAX, "gr_gamma": GAMMA, "gr_eps": EPS,
                         "backend": "torch", "lr": 1e-3, **overrides})


def run_step(model, rollout, rewards, s) -> list[torch.Tensor]:
    """grpo_step on a copy of `model`; the gradient it hands to the optimizer."""
    update = make_update(copy.deepcopy(model), s, Dist())
    seen = record_applied_gradient(update)
    scores = Scores(rewards, torch.zeros(len(rewards), 3))
    grpo_step(update, Dist(), rollout, scores, None, 0.0, s)
    return seen["grad"]


@pytest.fixture
def problem(float64_lm):
    model, tok = float64_lm
    torch.manual_seed(0)
    rollout = sample(model, tok, PROMPTS, G, T_MAX, 1.0)
    rewards = torch.randn(len(PROMPTS) * G, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, rollout, rewards


def _by_hand(model, rollout, rewards):
    """The pieces of the expected gradients, from autograd on explicit formulas (not the stage's code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_s = [id(p) in {id(q) for q in default_perturbed_parameters(model)} for p in params]
    adv = dr_grpo_advantages(rewards, G).unsqueeze(1)
    mask = rollout.completion_mask.double()
    n = mask.shape[0] * T_MAX  # N * T_max

    def surrogate(logp, old):  # -min(r A, clip(r) A), r = exp(logp - old), summed / (N * T_max)
        ratio = torch.exp(logp - old)
        return -(torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() / n

    logp0 = token_logprobs(model, rollout)
    g1 = torch.autograd.grad(-(adv * logp0 * mask).sum() / n, params)
    norm = torch.sqrt(sum((g * g).sum() for g in g1)).item()
    s1 = min(1.0, 10.0 / (norm + 1e-6))
    return params, in_s, adv, mask, n, surrogate, logp0.detach(), g1, s1


def _finite_difference(model, rollout, rewards, stored: bool):
    params, in_s, adv, mask, n, surrogate, logp0, g1, s1 = _by_hand(model, rollout, rewards)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, g, s in zip(moved.parameters(), g1, in_s):
            if s:
                p.add_(EPS * s1 * g)
    logp1 = token_logprobs(moved, rollout)
    old = logp0 if stored else logp1.detach()  # the authors' ratio pi_phi'/pi_phi, or ours (1)
    g2 = torch.autograd.grad(surrogate(logp1, old), [p for p in moved.parameters() if p.requires_grad])
    s2 = min(1.0, 10.0 / (torch.sqrt(sum((g * g).sum() for g in g2)).item() + 1e-6))
    return [s1 * a + GAMMA * (s2 * b - s1 * a) / EPS if s else s1 * a for a, b, s in zip(g1, g2, in_s)]


def _hvp(model, rollout, rewards, stored: bool):
    params, in_s, adv, mask, n, surrogate, logp0, g1, s1 = _by_hand(model, rollout, rewards)
    s_params = [p for p, s in zip(params, in_s) if s]
    v = [s1 * g for g, s in zip(g1, in_s) if s]
    logp = token_logprobs(model, rollout)
    loss = surrogate(logp, logp.detach()) if stored else -(adv * logp * mask).sum() / n
    g = torch.autograd.grad(loss, s_params, create_graph=True)
    hv = iter(torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), s_params))
    return [s1 * a + GAMMA * next(hv) if s else s1 * a for a, s in zip(g1, in_s)], v, s_params, in_s, adv, mask, n


def _assert_gradients(got, expected, rtol):
    scale = max(e.abs().max().item() for e in expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("ratio", ["one", "stored"])
def test_finite_difference_second_pass_ratio(problem, ratio):
    """gr_second_pass_ratio: stored takes the second pass's ratio against the log-probs stored at phi."""
    model, rollout, rewards = problem
    got = run_step(model, rollout, rewards, settings(gr_second_pass_ratio=ratio))
    _assert_gradients(got, _finite_difference(model, rollout, rewards, stored=ratio == "stored"), rtol=1e-6)


def test_second_pass_ratio_adds_the_outer_product_term_in_both_estimators(problem):
    """The stored ratio's Hessian holds -(1/(N T)) sum_it A_i (grad p_it . v) grad p_it besides ours; the hvp
    estimator computes each exactly, and the finite difference tends to each."""
    model, rollout, rewards = problem
    ours, v, s_params, in_s, adv, mask, n = _hvp(model, rollout, rewards, stored=False)
    authors, *_ = _hvp(model, rollout, rewards, stored=True)
    _assert_gradients(run_step(model, rollout, rewards, settings(gr_estimator="hvp")), ours, rtol=1e-9)
    _assert_gradients(run_step(model, rollout, rewards, settings(gr_estimator="hvp", gr_second_pass_ratio="stored")),
                      authors, rtol=1e-9)
    logp = token_logprobs(model, rollout)
    outer = [torch.zeros_like(p) for p in s_params]
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                grad_p = torch.autograd.grad(logp[i, t], s_params, retain_graph=True)
                along = sum((a * b).sum() for a, b in zip(grad_p, v))
                for acc, gp in zip(outer, grad_p):
                    acc -= adv[i, 0] * along * gp / n
    difference = [a - b for a, b, s in zip(authors, ours, in_s) if s]
    _assert_gradients(difference, [GAMMA * o for o in outer], rtol=1e-8)
    assert all(torch.equal(a, b) for a, b, s in zip(authors, ours, in_s) if not s)
    relative = torch.cat([d.flatten() for d in difference]).norm() / torch.cat([o.flatten() for o in ours]).norm()
    assert relative > 0.05  # the option changes the gradient measurably (15% here)
    fd = run_step(model, rollout, rewards, settings(gr_second_pass_ratio="stored", gr_eps=1e-6))
    _assert_gradients(fd, authors, rtol=1e-4)  # O(eps) from the limit


def _masters(update) -> list[torch.Tensor]:
    """The fp32 master weights of a bf16 model, whichever backend keeps them."""
    if hasattr(update, "engine"):
        from deepspeed.utils import safe_get_full_fp32_param
        return [safe_get_full_fp32_param(p).detach().clone() for p in update.model.parameters() if p.requires_grad]
    return [m.detach().clone() for m in update.master]


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_master_weight_refresh_trains_from_the_bf16_weights(tiny_lm, backend):
    """gr_refresh_master_weights: the fp32 master weights become the bf16 weights before the optimizer step.
    Two identical runs, one with the refresh: their masters after the step differ by exactly what bf16 rounding
    took from the master before it; without the option, nothing else differs."""
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    base, tok = tiny_lm
    torch.manual_seed(0)
    rollout = sample(base, tok, PROMPTS, G, T_MAX, 1.0)
    rewards = torch.randn(len(PROMPTS) * G, generator=torch.Generator().manual_seed(1))
    scores = Scores(rewards, torch.zeros(len(rewards), 3))
    s = settings(backend=backend, lr=1e-3, gr_eps=1e-3)
    runs = []
    for refresh in (False, True):
        update = make_update(copy.deepcopy(base).to(torch.bfloat16), s, Dist())
        grpo_step(update, Dist(), rollout, scores, None, 0.0, s.replace(gr_gamma=0.0))  # masters gain sub-bf16 bits
        before = _masters(update)
        grpo_step(update, Dist(), rollout, scores, None, 0.0, s.replace(gr_refresh_master_weights=refresh))
        runs.append((before, _masters(update)))
    (before, plain), (before_again, refreshed) = runs
    rounding = [b.to(torch.bfloat16).float() - b for b in before]
    assert max(r.abs().max().item() for r in rounding) > 1e-5
    for a, b in zip(before, before_again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for r, p, q in zip(rounding, refreshed, plain):
        torch.testing.assert_close(r - (p - q), torch.zeros_like(r), rtol=0, atol=1e-6)


@pytest.mark.skipif(not deepspeed_available(), reason="deepspeed is not installed")
def test_hvp_under_deepspeed_bf16_applies_the_float64_gradient(tiny_lm):
    """The exact estimator through DeepSpeed ZeRO-2 in bf16 (its gradient handed over as a backward of
    sum <p, g>, partitioned by the engine): the gradient the optimizer gets matches the float64 one's direction."""
    base, tok = tiny_lm
    torch.manual_seed(0)
    rollout = sample(base, tok, PROMPTS, G, T_MAX, 1.0)
    rewards = torch.randn(len(PROMPTS) * G, generator=torch.Generator().manual_seed(1))
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    got = run_step(bf16, rollout, rewards, settings(gr_estimator="hvp", backend="deepspeed"))
    truth = run_step(bf16.double(), rollout, rewards.double(), settings(gr_estimator="hvp"))
    a, b = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in truth])
    assert (a @ b / (a.norm() * b.norm())).item() > 0.99


def test_master_weight_refresh_is_refused_without_master_weights(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(ConfigError, match="gr_refresh_master_weights"):
        make_update(copy.deepcopy(model), settings(gr_refresh_master_weights=True), Dist())


def test_master_weight_refresh_is_refused_with_hvp(tmp_path):
    from tests.conftest import write_config
    path = write_config(tmp_path, methods={"gr": {"gr_gamma": 0.1, "gr_estimator": "hvp",
                                                  "gr_refresh_master_weights": True}})
    with pytest.raises(ConfigError, match="methods.gr: gr_refresh_master_weights"):
        load_config(path)


def test_stage_warns_once_when_bf16_rounds_the_perturbation_away(micro_run, tmp_path, capsys):
    """The GRPO stage in bf16 with the finite difference logs the realized perturbation every GR step and says
    once, in one line, that it is lost and what to do; with gr_estimator: hvp nothing is perturbed, no warning."""
    import pandas as pd

    from rlhf.cli import main
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    dst = _copy_upstream(micro_run, tmp_path)
    cfg = write_config(tmp_path)
    for estimator in ("finite_difference", "hvp"):
        assert main(["grpo", "--config", str(cfg), "--method", "gr", "--seed", "0", "model.dtype=bfloat16",
                     f"grpo.gr_estimator={estimator}"]) == 0
        err = capsys.readouterr().err
        df = pd.read_json(dst / "grpo" / "gr" / "seed0" / "metrics.jsonl", lines=True).dropna(subset=["proxy_reward"])
        assert df["gr/curvature"].notna().all()
        if estimator == "finite_difference":
            assert df["gr/realized_perturbation"].notna().all() and (df["gr/perturbation_error"] > 0.5).all()
            assert err.count("warning: GR's perturbation") == 1 and "gr_estimator: hvp" in err
        else:
            assert "gr/realized_perturbation" not in df and "warning" not in err


@pytest.mark.parametrize("estimator", ["finite_difference", "hvp"])
@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_gr_correction_survives_into_a_bf16_update(backend, estimator):
    """GR's correction reaches the optimizer whole in bf16: both backends keep the written gradient in fp32 (the torch
    backend's master copies, DeepSpeed's fp32 gradient partitions). Stored in bf16 gradients, as before, 0.28 of it
    survived with hvp (39% of its elements lost) and 0.985 with the finite difference, whose bf16 term is mostly
    rounding noise and so larger (docs/paper-scale.md, Multi-GPU training). make gpu-smoke measures the same on a GPU."""
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    from rlhf.smoke import gr_correction_share
    share = gr_correction_share("cpu", backend, estimator)
    print(f"GR correction share in the bf16 update ({backend}, {estimator}): {share:.4f}")
    assert share > 0.999


def _tied(rewards: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """`rewards` with every completion of the given groups rewarded alike (their advantages exactly 0)."""
    rewards = rewards.clone()
    for k in groups:
        rewards[k * G:(k + 1) * G] = 0.5
    return rewards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [{}, {"gr_gamma": GAMMA}, {"gr_gamma": GAMMA, "gr_estimator": "hvp"},
                                    {"signcert_quantile": 0.3}])
def test_skipping_zero_advantage_micro_batches_leaves_the_update_bit_for_bit(tiny_lm, dtype, method):
    """grpo.skip_zero_advantage: the micro-batches of tied groups get no backward (fewer backward calls), and the
    weights after the step and the step's statistics are those of the run that computes every micro-batch.
    Groups 0 and 2 of 3 tie: micro-batches 0, 1, 4 and 5 have zero advantages, and all but the last (the
    accumulation boundary) are skipped."""
    base, tok = tiny_lm
    torch.manual_seed(0)
    prompts = PROMPTS + ["post : carol found the dog . tldr :"]
    rollout = sample(base, tok, prompts, G, T_MAX, 1.0)
    rewards = _tied(torch.randn(len(prompts) * G, generator=torch.Generator().manual_seed(1)), [0, 2])
    scores = Scores(rewards, torch.randn(len(rewards), 3, generator=torch.Generator().manual_seed(2)))
    runs = {}
    for skip in (False, True):
        s = settings(**{"gr_gamma": 0.0, "micro_batch_size": 2, "skip_zero_advantage": skip, **method})
        model = copy.deepcopy(base).to(dtype)
        update = make_update(model, s, Dist())
        calls, backward = [], update.backward
        update.backward = lambda loss, boundary: (calls.append(boundary), backward(loss, boundary))
        stats = grpo_step(update, Dist(), rollout, scores, None, 0.0, s)
        runs[skip] = [p.detach().clone() for p in model.parameters()], stats, calls
    (weights, stats, calls), (weights_skip, stats_skip, calls_skip) = runs[False], runs[True]
    passes = 1 if method.get("gr_estimator") == "hvp" else 2 if method.get("gr_gamma") else 1
    if method.get("gr_estimator") != "hvp":  # hvp differentiates by torch.autograd.grad, not update.backward
        assert len(calls) == 6 * passes and len(calls_skip) == 3 * passes and calls_skip.count(True) == passes
    assert stats["update/skipped_fraction"] == 0 and stats_skip["update/skipped_fraction"] == 3 / 6
    for a, b in zip(weights, weights_skip):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, p.to(dtype)) for a, p in zip(weights, base.parameters()))
    for key in stats:
        if key not in ("update/skipped_fraction", "logprobs") and not key.startswith("time/"):
            assert stats_skip[key] == pytest.approx(stats[key], rel=1e-6, abs=1e-12), key
    # hvp runs its passes with SDPA's math kernel (double backward); a skipped micro-batch's statistics come from the
    # default kernel, which in bf16 rounds differently (the update itself is unaffected: compared exactly above)
    exact = dtype == torch.float32 or method.get("gr_estimator") != "hvp"
    torch.testing.assert_close(stats_skip["logprobs"], stats["logprobs"], rtol=0 if exact else 2 ** -8,
                               atol=0 if exact else 1e-3)


def test_no_micro_batch_is_skipped_under_a_kl_penalty_or_when_a_rank_has_signal():
    """The skip set is computed from the gathered advantages, the same on every rank: a micro-batch is skipped only
    where all ranks' rows are zero, never the last one, and never when the KL penalty gives zero-advantage rows
    a gradient."""
    from rlhf.trainer import zero_gradient_chunks
    chunks = [slice(0, 2), slice(2, 4), slice(4, 6)]
    advantages = torch.tensor([[0.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])  # 2 ranks x 6 rows
    assert zero_gradient_chunks(advantages, chunks, 0.0) == {0}
    assert zero_gradient_chunks(advantages, chunks, 0.05) == set()
    assert zero_gradient_chunks(torch.zeros(2, 6), chunks, 0.0) == {0, 1}
