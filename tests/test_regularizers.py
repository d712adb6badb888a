"""GR, SignCert-PO and Reference Resets against their math."""
import copy

import pytest
import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.gr import default_perturbed_parameters, finite_difference_gr
from rlhf.algorithms.losses import dr_grpo_loss
from rlhf.algorithms.resets import is_reset_step, iteration, reset_reference, scheduled_beta
from rlhf.algorithms.signcert import certified_radius, signcert_weights
from rlhf.generation import sample
from rlhf.policy import token_logprobs


@pytest.fixture
def gr_setup(tiny_lm, monkeypatch):
    """A float64 tiny GPT-NeoX LM, fixed rollouts and a Dr.GRPO loss closure over two micro-batches.

    Exactness needs float64 all the way: GPT-NeoX normalizes with nn.LayerNorm (Qwen2's RMSNorm computes in
    float32), eager attention (SDPA's CPU kernel has no double backward), and its softmax, which transformers
    pins to float32, is kept in float64 here.
    """
    from rlhf.models import build_tiny_causal_lm
    _, tok = tiny_lm
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **kw: softmax(
        x, dim=dim, dtype=torch.promote_types(x.dtype, dtype) if dtype is not None else None, **kw))
    build = dict(arch="gpt_neox", hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position_embeddings=64)
    model64 = build_tiny_causal_lm(build, tok, seed=0).double()
    model64.set_attn_implementation("eager")
    torch.manual_seed(0)
    rollout = sample(model64, tok, ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"], 4, 5, 1.0)
    adv = dr_grpo_advantages(torch.randn(8, dtype=torch.float64), 4)

    def loss_fn(m, rows):
        from rlhf.generation import Rollout
        sub = Rollout(rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                      rollout.completion_mask[rows], [rollout.texts[i] for i in rows])
        logp = token_logprobs(m, sub)
        return dr_grpo_loss(logp, logp.detach(), adv[rows], sub.completion_mask.double(), 5) * len(rows) / 8

    def closure():  # accumulate over micro-batches like a trainer with gradient accumulation
        total = 0.0
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
            loss = loss_fn(model64, rows)
            loss.backward()
            total += loss.item()
        return total

    def full_loss(m):
        # The function whose gradient the trainer follows at *every* phi: with one update per batch the
        # Dr.GRPO surrogate recomputes old = logp.detach() at phi' too, so its gradient field is REINFORCE's.
        # (Double backprop through exp(logp - logp.detach()) would add an outer-product term no trainer sees.)
        logp = token_logprobs(m, rollout)
        return -(adv.unsqueeze(1) * logp * rollout.completion_mask.double()).sum() / (8 * 5)

    return model64, closure, full_loss


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
    model, closure, full_loss = gr_setup
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
    model, closure, _ = gr_setup
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

    for excluded in ("g1", "g2"):
        stats = finite_difference_gr(model, closure, gamma=gamma, eps=eps, g1_clip=c1, g2_clip=c2, excluded_grad=excluded)
        assert stats.g1_norm == pytest.approx(n1, rel=1e-9) and stats.g2_norm == pytest.approx(n2, rel=1e-9)
        for p, a, b in zip(params, g1, g2):
            if id(p) in pid:
                expected = s1 * a + gamma * (s2 * b - s1 * a) / eps
            else:
                expected = s1 * a if excluded == "g1" else s2 * b
            torch.testing.assert_close(p.grad, expected, rtol=1e-7, atol=1e-12)


def test_gr_restores_parameters_bit_exactly(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)  # float32, where phi + eps*g - eps*g != phi
    torch.manual_seed(0)
    rollout = sample(model, tok, ["post : alice lost the car . tldr :"], 4, 5, 1.0)
    adv = dr_grpo_advantages(torch.randn(4), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def closure():
        logp = token_logprobs(model, rollout)
        loss = dr_grpo_loss(logp, logp.detach(), adv, rollout.completion_mask.float(), 5)
        loss.backward()
        return loss

    finite_difference_gr(model, closure, gamma=0.1, eps=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="excluded_grad"):
        finite_difference_gr(model, closure, gamma=0.1, eps=1e-3, excluded_grad="g3")


# --- SignCert-PO ---

def _random_batch(seed, groups=6, G=8, d=5):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(groups * G, d, generator=g)
    w, b = torch.randn(d, generator=g), torch.randn(1, generator=g)
    rewards = features @ w + b
    return rewards, features, G


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


@pytest.mark.parametrize("q", [0.1, 0.25, 0.4, 0.5])
def test_signcert_weights_closed_form_and_quantile(q):
    rewards, features, G = _random_batch(11)
    adv = dr_grpo_advantages(rewards, G)
    radius = certified_radius(adv, features, G)
    eps = torch.quantile(radius, q)
    rho = signcert_weights(adv, features, G, q)
    torch.testing.assert_close(rho, (1 - eps / radius).clamp_min(0))
    assert (rho == 0).sum().item() == (radius <= eps).sum().item()
    assert abs((rho == 0).float().mean().item() - q) <= 1 / len(adv) + 1e-9
    unclipped = signcert_weights(adv, features, G, q, clip_negative=False)
    torch.testing.assert_close(unclipped, 1 - eps / radius)
    literal = signcert_weights(adv, features, G, q, epsilon_from="inverse_radius")
    torch.testing.assert_close(literal, (1 - torch.quantile(1 / radius, q) / radius).clamp_min(0))


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
    zero_adv = signcert_weights(torch.zeros(8), features, G, 0.3)
    assert torch.equal(zero_adv, torch.zeros(8))
    with pytest.raises(ValueError):
        signcert_weights(adv, features, 3, 0.3)


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
