"""GR, SignCert-PO and Reference Resets against their math."""
import copy
import functools
import math

import pytest
import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.gr import (GRStats, LocalGradients, default_perturbed_parameters, double_backward_attention,
                                finite_difference_gr, hvp_gr)
from rlhf.algorithms.losses import dr_grpo_loss
from rlhf.algorithms.resets import is_reset_step, iteration, reset_reference, scheduled_beta
from rlhf.algorithms.signcert import certified_radius, signcert, signcert_weights
from rlhf.errors import ConfigError
from rlhf.generation import sample
from rlhf.policy import token_logprobs
from tests.conftest import build_tiny, micro_grpo


MICRO_BATCHES = (slice(0, 4), slice(4, 8))


@pytest.fixture
def gr_setup(float64_lm):
    """A float64 tiny LM, fixed rollouts, and the Dr.GRPO loss over two micro-batches: as a closure that runs
    backward (what the finite difference calls) and as one forward-only callable per micro-batch (hvp)."""
    model64, tok = float64_lm
    torch.manual_seed(0)
    rollout = sample(model64, tok, ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"], 4, 5, 1.0)
    adv = dr_grpo_advantages(torch.randn(8, dtype=torch.float64), 4)

    def loss_fn(m, rows):
        logp = token_logprobs(m, rollout.rows(rows))
        return dr_grpo_loss(logp, None, adv[rows], rollout.completion_mask[rows].double(), 5) * 0.5  # 4 of 8 rows

    def closure(perturbed=False):  # accumulate over micro-batches like a trainer with gradient accumulation
        total = 0.0
        for rows in MICRO_BATCHES:
            loss = loss_fn(model64, rows)
            loss.backward()
            total += loss.item()
        return total

    def full_loss(m):
        # The function whose gradient the trainer follows at *every* phi: with one update per batch the
        # Dr.GRPO surrogate recomputes old = logp.detach() at phi' too, so its gradient field is REINFORCE's.
        logp = token_logprobs(m, rollout)
        return -(adv.unsqueeze(1) * logp * rollout.completion_mask.double()).sum() / (8 * 5)

    micro_losses = [functools.partial(loss_fn, model64, rows) for rows in MICRO_BATCHES]
    return model64, closure, micro_losses, full_loss


def exact_gr_gradient(model, full_loss, gamma, perturbed):
    """grad of L + (gamma/2) ||grad_S L||^2 by double backprop, for the parameters in S."""
    params = list(perturbed)
    loss = full_loss(model)
    g = torch.autograd.grad(loss, params, create_graph=True)
    penalty = 0.5 * sum((x * x).sum() for x in g)
    total = torch.autograd.grad(loss + gamma * penalty, params)
    return [t.detach() for t in total]


@pytest.mark.parametrize("mask", ["all", "blocks"])
def test_gr_converges_to_exact_double_backprop_gradient(gr_setup, mask):
    """GR -> g + gamma H g of L + (gamma/2)||grad_S L||^2 as eps -> 0: the error is O(eps), ~10x per decade."""
    model, closure, _, full_loss = gr_setup
    all_params = [p for p in model.parameters() if p.requires_grad]
    perturbed = all_params if mask == "all" else default_perturbed_parameters(model)
    gamma = 0.5
    expected = exact_gr_gradient(model, full_loss, gamma, perturbed)
    scale = max(e.abs().max().item() for e in expected)
    errors = []
    for eps in (1e-5, 1e-6, 1e-7):
        finite_difference_gr(model, closure, gamma=gamma, eps=eps, g1_clip=1e9, g2_clip=1e9, perturb=perturbed)
        errors.append(max((p.grad - e).abs().max().item() for p, e in zip(perturbed, expected)))
    assert errors[-1] < 1e-5 * scale, errors
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5, errors
    # and the regularizer changes the gradient: GR != plain gradient
    plain = torch.autograd.grad(full_loss(model), perturbed)
    assert max((p.grad - g).abs().max().item() for p, g in zip(perturbed, plain)) > 1e3 * errors[-1]


def test_gr_default_perturbs_blocks_and_final_norm_only(tiny_lm):
    model, _ = tiny_lm
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in default_perturbed_parameters(model)}
    assert chosen == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.", "model.norm."))}
    assert "model.embed_tokens.weight" not in chosen


def test_gr_clipping_and_excluded_parameters(gr_setup):
    model, closure, _, _ = gr_setup
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = default_perturbed_parameters(model)
    pid = {id(p) for p in perturbed}
    gamma, eps, c1, c2 = 0.3, 1e-3, 1e-3, 2e-3  # clips far below the norms: both are active

    model.zero_grad()
    closure()
    g1 = [p.grad.clone() for p in params]
    n1 = torch.sqrt(sum((g * g).sum() for g in g1)).item()
    s1 = min(1.0, c1 / (n1 + 1e-6))
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g1):
            if id(p) in pid:
                p.add_(eps * s1 * g)
    model.zero_grad()
    closure()
    g2 = [p.grad.clone() for p in params]
    n2 = torch.sqrt(sum((g * g).sum() for g in g2)).item()
    s2 = min(1.0, c2 / (n2 + 1e-6))
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    assert s1 < 1 and s2 < 1

    for excluded in ("g1", "g2", "g2_raw"):
        stats = finite_difference_gr(model, closure, gamma=gamma, eps=eps, g1_clip=c1, g2_clip=c2, excluded_grad=excluded)
        assert stats.g1_norm == pytest.approx(n1, rel=1e-9) and stats.g2_norm == pytest.approx(n2, rel=1e-9)
        for p, a, b in zip(params, g1, g2):
            if id(p) in pid:
                expected = s1 * a + gamma * (s2 * b - s1 * a) / eps
            else:
                expected = {"g1": s1 * a, "g2": s2 * b, "g2_raw": b}[excluded]  # g2_raw: the authors' DeepSpeed code
            torch.testing.assert_close(p.grad, expected, rtol=1e-7, atol=1e-12)


def test_gr_restores_parameters_bit_exactly(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)  # float32, where phi + eps*g - eps*g != phi
    torch.manual_seed(0)
    rollout = sample(model, tok, ["post : alice lost the car . tldr :"], 4, 5, 1.0)
    adv = dr_grpo_advantages(torch.randn(4), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def closure(perturbed=False):
        logp = token_logprobs(model, rollout)
        loss = dr_grpo_loss(logp, logp.detach(), adv, rollout.completion_mask.float(), 5)
        loss.backward()
        return loss

    finite_difference_gr(model, closure, gamma=0.1, eps=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="excluded_grad"):
        finite_difference_gr(model, closure, gamma=0.1, eps=1e-3, excluded_grad="g3")


@pytest.mark.parametrize("drifted", [False, True])
@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_gr_restores_bf16_weights_from_the_master_copies_only_where_they_are_exact(tiny_lm, monkeypatch, backend,
                                                                                    drifted):
    """bf16 weights with fp32 master copies (the torch backend's, DeepSpeed's optimizer partitions): the finite
    difference restores each perturbed tensor from its master, rounded, and keeps no copy of its own; where a weight no
    longer equals its master rounded (changed outside the optimizer: drifted), it saves copies as before. Either way
    every weight is restored bit for bit."""
    from rlhf.algorithms import gr
    from rlhf.distributed import Dist, deepspeed_available, destroy_process_group, make_update
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    update = make_update(copy.deepcopy(tiny_lm[0]).to(torch.bfloat16), micro_grpo(gr_gamma=0.1, backend=backend),
                         Dist())
    model = update.model
    if drifted:
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)  # no longer the master rounded
    torch.manual_seed(0)
    rollout = sample(model, tiny_lm[1], ["post : alice lost the car . tldr :"], 4, 5, 1.0)
    adv = dr_grpo_advantages(torch.randn(4), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturbed = default_perturbed_parameters(model)
    weights, copies, real_clone = {p.data_ptr() for p in perturbed}, [], torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone",
                        lambda t, *a, **k: copies.append(t.data_ptr() in weights) or real_clone(t, *a, **k))

    def closure(perturbed=False):
        logp = token_logprobs(model, rollout)
        loss = dr_grpo_loss(logp, logp.detach(), adv.to(logp.dtype), rollout.completion_mask.to(logp.dtype), 5)
        update.backward(loss, boundary=True)
        return loss

    assert (gr._exact_masters(update, perturbed) is None) == drifted
    stats = finite_difference_gr(model, closure, gamma=0.1, eps=1e-3, grads=update)
    monkeypatch.undo()
    update.close()
    if backend == "deepspeed":
        destroy_process_group()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert stats.changed_fraction > 0  # the perturbation moved some bf16 weights, which came back
    assert sum(copies) == (len(perturbed) if drifted else 0)  # copies of the perturbed weights


class Recorder(LocalGradients):
    """Keeps the gradient a GR estimator writes, at full precision (a bf16 .grad would round it), in parameter order
    (written whole or one parameter at a time)."""

    def __init__(self, model):
        super().__init__(model)
        self.seen = {}

    def write(self, params, grads):
        self.seen.update({id(p): g.detach().double().clone() for p, g in zip(params, grads)})
        super().write(params, grads)

    @property
    def grads(self):
        return [self.seen[id(p)] for p in self.model.parameters() if id(p) in self.seen]


@pytest.mark.parametrize("mask", ["all", "blocks"])
@pytest.mark.parametrize("micro", [1, 2])
def test_hvp_equals_exact_double_backprop_gradient(gr_setup, mask, micro):
    """g + gamma H g on S, exactly (float64), with one micro-batch (graph kept) and two (g1 first)."""
    model, _, micro_losses, full_loss = gr_setup
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = params if mask == "all" else default_perturbed_parameters(model)
    losses = micro_losses if micro == 2 else [lambda: sum(f() for f in micro_losses)]
    gamma = 0.5
    expected = exact_gr_gradient(model, full_loss, gamma, perturbed)
    stats = hvp_gr(model, losses, gamma=gamma, g1_clip=1e9, perturb=perturbed)
    scale = max(e.abs().max().item() for e in expected)
    for p, e in zip(perturbed, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12 * scale)
    plain = torch.autograd.grad(full_loss(model), params)
    pid = {id(p) for p in perturbed}
    for p, g in zip(params, plain):
        if id(p) not in pid:
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-15)  # outside S: g1
    assert max((p.grad - g).abs().max().item() for p, g in zip(params, plain)) > 1e-3 * scale
    assert stats.g1_norm == pytest.approx(torch.sqrt(sum((g * g).sum() for g in plain)).item(), rel=1e-9)
    assert math.isnan(stats.g2_norm) and stats.loss == pytest.approx(sum(f().item() for f in micro_losses), rel=1e-9)


def test_hvp_is_the_eps_to_zero_limit_of_the_finite_difference(gr_setup):
    """With the paper's clips at 10 (inactive here: ||g1|| < 10) the finite difference -> hvp, error O(eps);
    the curvature g1^T H g1 / ||g1||^2 both report agrees."""
    model, closure, micro_losses, _ = gr_setup
    hvp = hvp_gr(model, micro_losses, gamma=0.5)
    assert hvp.g1_norm < 10
    exact = [p.grad.clone() for p in model.parameters()]
    errors = []
    for eps in (1e-4, 1e-5, 1e-6):
        fd = finite_difference_gr(model, closure, gamma=0.5, eps=eps)
        errors.append(max((p.grad - e).abs().max().item() for p, e in zip(model.parameters(), exact)))
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5, errors
    assert fd.curvature == pytest.approx(hvp.curvature, rel=1e-3) and hvp.curvature != 0


def test_hvp_clipping_and_excluded_parameters(gr_setup):
    """g1 clipped to c1: S gets s1 g1 + gamma H (s1 g1); the others s1 g1 ('g1', 'g2': the eps -> 0 limit of g2
    is g1) or the unclipped g1 ('g2_raw')."""
    model, _, micro_losses, full_loss = gr_setup
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = default_perturbed_parameters(model)
    pid = {id(p) for p in perturbed}
    g = torch.autograd.grad(full_loss(model), params, create_graph=True)
    g1 = [x.detach() for x in g]
    n1 = torch.sqrt(sum((x * x).sum() for x in g1)).item()
    c1, gamma = 0.1 * n1, 0.3
    s1 = c1 / (n1 + 1e-6)
    v = [s1 * x for x, p in zip(g1, params) if id(p) in pid]
    g_s = [x for x, p in zip(g, params) if id(p) in pid]
    hv = torch.autograd.grad(sum((x * y).sum() for x, y in zip(g_s, v)), perturbed)  # H (s1 g1) on S
    for excluded in ("g1", "g2", "g2_raw"):
        stats = hvp_gr(model, micro_losses, gamma=gamma, g1_clip=c1, excluded_grad=excluded)
        assert stats.g1_norm == pytest.approx(n1, rel=1e-9)
        hv_iter = iter(hv)
        for p, a in zip(params, g1):
            if id(p) in pid:
                expected = s1 * a + gamma * next(hv_iter)
            else:
                expected = a if excluded == "g2_raw" else s1 * a
            torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="excluded_grad"):
        hvp_gr(model, micro_losses, gamma=gamma, excluded_grad="g3")


def test_hvp_refuses_attention_without_a_double_backward(tiny_lm):
    model, _ = tiny_lm
    model = copy.deepcopy(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="double backward"):
        with double_backward_attention(model):
            pass


def _bf16_problem(hidden: int):
    """A random tiny Qwen2 LM in bf16 (SDPA attention, HF's N(0, 0.02) initialisation), its float64 copy with the
    same weights, and an on-policy Dr.GRPO loss on fixed rollouts for either model."""
    model, tok = build_tiny(hidden_size=hidden, intermediate_size=2 * hidden)
    torch.manual_seed(0)
    rollout = sample(model, tok, ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"], 4, 6, 1.0)
    adv = dr_grpo_advantages(torch.randn(8), 4)
    bf16 = model.to(torch.bfloat16)
    f64 = copy.deepcopy(bf16).double()

    def loss(m, scale=1.0):
        logp = token_logprobs(m, rollout)
        return scale * dr_grpo_loss(logp, None, adv.to(logp.dtype), rollout.completion_mask.to(logp.dtype), 6)
    return bf16, f64, loss


def _curvature_term(model, estimate) -> torch.Tensor:
    """The gamma-free GR term on S: (gradient at gamma = 1) - (gradient at gamma = 0)."""
    with_gr, without = Recorder(model), Recorder(model)
    estimate(model, 1.0, with_gr)
    estimate(model, 0.0, without)
    in_s = {id(p) for p in default_perturbed_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([(a - b).flatten() for p, a, b in zip(params, with_gr.grads, without.grads) if id(p) in in_s])


def _cosine(a, b) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def test_hvp_in_bf16_matches_the_float64_truth(record_property, capsys):
    """H g1 from a bf16 model by double backprop is within a few percent of the same product in float64 at the
    same weights; the bf16 finite difference (eps = 1e-3) is measured and recorded beside it."""
    bf16, f64, loss = _bf16_problem(hidden=64)

    def hvp(m, gamma, grads):
        return hvp_gr(m, [functools.partial(loss, m)], gamma=gamma, g1_clip=1e9, grads=grads)

    def fd(m, gamma, grads):
        def closure(perturbed=False):
            value = loss(m)
            value.backward()
            return value
        return finite_difference_gr(m, closure, gamma=gamma, eps=1e-3, g1_clip=1e9, g2_clip=1e9, grads=grads)

    truth = _curvature_term(f64, hvp)
    ours = _curvature_term(bf16, hvp)
    assert _cosine(ours, truth) > 0.99 and (ours - truth).norm() / truth.norm() < 0.05
    finite_difference = _curvature_term(bf16, fd)
    record_property("bf16_hvp_cosine", _cosine(ours, truth))
    record_property("bf16_finite_difference_cosine", _cosine(finite_difference, truth))
    with capsys.disabled():
        print(f"\n  bf16 H*g1 vs float64: hvp cosine {_cosine(ours, truth):.5f}, "
              f"finite difference (eps 1e-3) cosine {_cosine(finite_difference, truth):.3f}")


def test_realized_perturbation_is_exact_in_float64_and_lost_in_bf16():
    """phi + eps*g1_hat at eps = 1e-3 with weights of LLM scale (N(0, 0.02) added to every tensor, so no exact zeros
    such as fresh biases store any perturbation exactly) and the per-element size of g1_hat that a 0.49B-parameter
    model gets at the paper's clip (||g1_hat|| = 10 spread over 4.9e8 elements): float64 stores it exactly,
    bf16 keeps under half of it (docs/regularizers.md: 0.15 of it on a bf16 model with LLM-scale weights)."""
    bf16, _, loss = _bf16_problem(hidden=64)
    with torch.no_grad():
        noise = torch.Generator().manual_seed(0)
        for p in bf16.parameters():
            p.add_((0.02 * torch.randn(p.shape, generator=noise)).to(p.dtype))
    f64 = copy.deepcopy(bf16).double()
    clip = 10 * (sum(p.numel() for p in default_perturbed_parameters(bf16)) / 4.9e8) ** 0.5

    def fd(m) -> GRStats:
        def closure(perturbed=False):
            value = loss(m, scale=1e4)  # ||g1|| >> clip: ||eps * g1_hat|| = eps * clip exactly
            value.backward()
            return value
        return finite_difference_gr(m, closure, gamma=0.1, eps=1e-3, g1_clip=clip)

    exact, rounded = fd(f64), fd(bf16)
    assert exact.g1_norm > clip and rounded.g1_norm > clip
    assert exact.realized_perturbation == pytest.approx(1.0, abs=1e-9) and exact.perturbation_error < 1e-9
    assert exact.changed_fraction == 1.0
    assert rounded.realized_perturbation < 0.5 and rounded.perturbation_error > 0.9
    assert rounded.changed_fraction < 0.05


# --- SignCert-PO ---

def _random_batch(seed, groups=6, G=8, d=5, degenerate=0, dtype=torch.float32):
    """Rewards from a linear head on random features; the first `degenerate` groups share one completion."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(groups * G, d, generator=g, dtype=torch.float64)
    features[: degenerate * G] = features[: degenerate * G: G].repeat_interleave(G, 0)
    w, b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)
    return (features @ w + b).to(dtype), features.to(dtype), G


@pytest.mark.parametrize("seed", range(5))
def test_certified_radius_is_the_smallest_sign_flipping_head_perturbation(seed):
    rewards, features, G = _random_batch(seed)
    adv = dr_grpo_advantages(rewards, G)
    radius = certified_radius(adv, features, G)
    h = features.view(-1, G, features.shape[1])
    centered = (h - h.mean(1, keepdim=True)).view(-1, features.shape[1])
    for j in range(len(adv)):
        # under w -> w + delta every advantage becomes A + delta^T (h - h_bar); the bias cancels
        direction = -adv[j].sign() * centered[j] / centered[j].norm()
        flip = dr_grpo_advantages(rewards + features @ (direction * radius[j] * 1.001), G)[j]
        keep = dr_grpo_advantages(rewards + features @ (direction * radius[j] * 0.999), G)[j]
        assert flip.sign() == -adv[j].sign() and keep.sign() == adv[j].sign()
    torch.testing.assert_close(radius, adv.abs() / centered.norm(dim=1))


@pytest.mark.parametrize("seed", range(3))
def test_signcert_advantage_is_the_worst_case_under_a_per_completion_head_change(seed):
    """rho_j A_j = min over ||delta_j|| <= eps of the advantage signed as the nominal one (Theorem 3.2): reached by
    delta_j = -eps sign(A_j) (h_j - h_bar) / ||h_j - h_bar||, never undercut by random deltas in the ball."""
    rewards, features, G = _random_batch(seed, dtype=torch.float64)
    adv = dr_grpo_advantages(rewards, G)
    cert = signcert(adv, features, G, 0.4)
    eps = cert.epsilon
    h = features.view(-1, G, features.shape[1])
    centered = (h - h.mean(1, keepdim=True)).view(-1, features.shape[1])
    gen = torch.Generator().manual_seed(seed)
    for j in range(len(adv)):
        worst = -eps * adv[j].sign() * centered[j] / centered[j].norm()
        attacked = dr_grpo_advantages(rewards + features @ worst, G)[j]
        torch.testing.assert_close(attacked, cert.rho[j] * adv[j], rtol=1e-10, atol=1e-12)
        for _ in range(20):
            delta = torch.randn(features.shape[1], generator=gen, dtype=torch.float64)
            delta = delta * eps * torch.rand(1, generator=gen, dtype=torch.float64) / delta.norm()
            other = dr_grpo_advantages(rewards + features @ delta, G)[j]
            assert adv[j].sign() * other >= adv[j].sign() * attacked - 1e-10
    assert (cert.rho < 0).any() and (cert.rho > 0).any()  # signs flipped inside the radius, kept outside


@pytest.mark.parametrize("q", [0.1, 0.25, 0.4, 0.5])
def test_signcert_closed_form_quantile_over_nonzero_advantages(q):
    """Default: eps = Quantile_q of the radii of completions with A != 0 (two of six groups are degenerate),
    rho = 1 - eps/Delta unclipped; a fraction ~q of those completions has rho <= 0; A = 0 gives rho = 0."""
    rewards, features, G = _random_batch(11, degenerate=2)
    adv = dr_grpo_advantages(rewards, G)
    nonzero = adv != 0
    assert nonzero.sum() == 4 * G  # the degenerate groups' advantages are exactly 0
    radius = certified_radius(adv, features, G)
    eps = torch.quantile(radius[nonzero], q)
    cert = signcert(adv, features, G, q)
    assert cert.epsilon == eps
    expected = torch.where(nonzero, 1 - eps / radius, torch.zeros_like(radius))
    torch.testing.assert_close(cert.rho, expected)
    assert abs((cert.rho[nonzero] <= 0).float().mean().item() - q) <= 1 / nonzero.sum().item() + 1e-9
    assert torch.equal(signcert_weights(adv, features, G, q), cert.rho)
    # the ablations, one at a time
    torch.testing.assert_close(signcert_weights(adv, features, G, q, clip_negative=True), expected.clamp_min(0))
    all_eps = torch.quantile(radius, q)  # zero radii of the degenerate groups drag eps down
    assert all_eps < eps
    torch.testing.assert_close(signcert_weights(adv, features, G, q, quantile_over="all"),
                               torch.where(nonzero, 1 - all_eps / radius, torch.zeros_like(radius)))
    literal = signcert(adv, features, G, q, epsilon_from="inverse_radius")
    assert literal.epsilon == torch.quantile(1 / radius[nonzero], q)
    torch.testing.assert_close(literal.rho, torch.where(nonzero, 1 - literal.epsilon / radius, torch.zeros_like(radius)))


def test_signcert_keeps_the_input_precision():
    rewards, features, G = _random_batch(3, dtype=torch.float64)
    adv = dr_grpo_advantages(rewards, G)
    exact = signcert(adv, features, G, 0.3)
    assert exact.rho.dtype == exact.epsilon.dtype == exact.radius.dtype == torch.float64
    low = signcert(adv.float(), features.to(torch.bfloat16), G, 0.3)  # a bf16 RM's features: computed in fp32
    assert low.rho.dtype == torch.float32
    torch.testing.assert_close(low.rho.double(), signcert(adv.float().double(), features.to(torch.bfloat16).double(),
                                                          G, 0.3).rho, rtol=1e-4, atol=1e-4)


def test_degenerate_groups_get_exactly_zero_advantages():
    """The rounded mean of equal floats can differ from them by an ulp (0.26996344 x 8 in float32 does)."""
    value = 0.26996344327926636
    x = torch.full((8,), value)
    assert (x - x.mean()).abs().max() > 0  # what a plain r - mean(r) leaves
    rewards = torch.cat([x, torch.arange(8.0)])
    adv = dr_grpo_advantages(rewards, 8)
    assert torch.equal(adv[:8], torch.zeros(8)) and torch.allclose(adv[8:], torch.arange(8.0) - 3.5)


def test_signcert_edge_cases():
    G = 4
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0],     # h_bar = 0
                             [0.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])     # h_j = h_bar for j = 4, 7
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, 1.0, -1.0, -0.5])
    radius = certified_radius(adv, features, G)
    assert radius[0] == 0 and radius[3] == 0                      # A = 0
    assert torch.isinf(radius[4]) and torch.isinf(radius[7])      # h_j = h_bar, A != 0
    rho = signcert_weights(adv, features, G, 0.5)
    assert rho[0] == 0 and rho[3] == 0 and rho[4] == 1 and rho[7] == 1
    assert torch.all(torch.isfinite(rho))
    zero_adv = signcert(torch.zeros(8), features, G, 0.3)
    assert torch.equal(zero_adv.rho, torch.zeros(8)) and zero_adv.epsilon == 0  # nothing to certify: eps = 0
    with pytest.raises(ValueError):
        signcert_weights(adv, features, 3, 0.3)
    with pytest.raises(ValueError, match="quantile_over"):
        signcert_weights(adv, features, G, 0.3, quantile_over="some")


# --- Reference Resets ---

def test_resets_happen_exactly_at_multiples_of_R():
    assert [s for s in range(1, 13) if is_reset_step(s, 4)] == [4, 8, 12]
    assert not any(is_reset_step(s, 0) for s in range(10))
    assert [iteration(s, 4) for s in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [scheduled_beta(0.3, s, 4) for s in (1, 4, 5, 9)] == pytest.approx([0.3, 0.3, 0.15, 0.1])
    assert scheduled_beta(0.3, 100, 0) == 0.3


def test_reset_reference_copies_the_policy(tiny_lm):
    model, _ = tiny_lm
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    reset_reference(reference, policy)
    for a, b in zip(policy.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
