"""The algorithm core against its math."""
import numpy as np
import pytest
import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.losses import dr_grpo_loss, k3_kl
from rlhf.generation import sample
from rlhf.policy import token_logprobs
from rlhf.stats import mean_ci, winrate_ci


def test_advantages_subtract_group_mean_without_std_scaling():
    r = torch.tensor([1.0, 3.0, 5.0, 7.0, 0.0, 0.0, 0.0, 4.0])
    a = dr_grpo_advantages(r, group_size=4)
    assert torch.allclose(a, torch.tensor([-3.0, -1.0, 1.0, 3.0, -1.0, -1.0, -1.0, 3.0]))
    assert torch.allclose(a.view(2, 4).sum(1), torch.zeros(2))


def test_advantages_reject_partial_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        dr_grpo_advantages(torch.zeros(8), 3)


def test_k3_kl_is_nonnegative_zero_at_equality_and_matches_formula():
    p = torch.randn(100).clamp(max=0) - 0.1
    q = torch.randn(100).clamp(max=0) - 0.1
    kl = k3_kl(p, q)
    assert torch.all(kl >= 0)
    assert torch.allclose(k3_kl(p, p), torch.zeros(100))
    # hand values, both orders (k3 is asymmetric: swapped arguments fail): KL estimate of pi_ref / pi
    half, quarter = torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))
    assert k3_kl(half, quarter).item() == pytest.approx(0.1931472)   # 0.5 - ln 0.5 - 1
    assert k3_kl(quarter, half).item() == pytest.approx(0.3068528)   # 2 - ln 2 - 1


def test_k3_kl_estimates_kl_divergence():
    torch.manual_seed(0)
    logits_p, logits_q = torch.randn(6), torch.randn(6)
    lp, lq = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    exact = (lp.exp() * (lp - lq)).sum()
    x = torch.distributions.Categorical(logits=logits_p).sample((200_000,))
    assert k3_kl(lp[x], lq[x]).mean().item() == pytest.approx(exact.item(), rel=0.03)


def test_dr_grpo_gradient_is_reinforce_with_group_mean_baseline(tiny_lm):
    """grad of the Dr.GRPO loss == -(1/(N*T_max)) sum_i A_i sum_t grad log pi(y_it), on a real tiny model."""
    model, tok = tiny_lm
    torch.manual_seed(1)
    G, T_max = 4, 6
    rollout = sample(model, tok, ["post : alice lost the car . tldr :", "post : bob sold the key . tldr :"], G, T_max, 1.0)
    rewards = torch.randn(2 * G, dtype=torch.float32)
    adv = dr_grpo_advantages(rewards, G)
    mask = rollout.completion_mask.float()
    params = [p for p in model.parameters() if p.requires_grad]

    logp = token_logprobs(model, rollout)
    loss = dr_grpo_loss(logp, logp.detach(), adv, mask, T_max, clip_eps=0.2)
    ours = torch.autograd.grad(loss, params)

    logp = token_logprobs(model, rollout)
    reinforce = -(adv.unsqueeze(1) * logp * mask).sum() / (2 * G * T_max)
    expected = torch.autograd.grad(reinforce, params)
    for g, e in zip(ours, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in ours)


def test_dr_grpo_normalizes_by_constant_not_sequence_length():
    logp = torch.zeros(2, 5, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss = dr_grpo_loss(logp, logp.detach(), adv, mask, max_tokens=10)
    (grad,) = torch.autograd.grad(loss, logp)
    # every unmasked token gets -A/(N*T_max) whatever its sequence's length
    assert torch.allclose(grad, -adv.unsqueeze(1) * mask / 20)


def test_dr_grpo_kl_term_adds_beta_times_mean_k3():
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.9]]))
    ref = torch.log(torch.tensor([[0.4, 0.3], [0.3, 0.8]]))
    mask = torch.ones(2, 2)
    zero_adv = torch.zeros(2)
    loss = dr_grpo_loss(logp, logp, zero_adv, mask, max_tokens=4, ref_logprobs=ref, kl_beta=0.5)
    # sum over tokens of r/p - ln(r/p) - 1 = 0.1243504 by hand; beta 0.5, divided by N * T_max = 2 * 4
    assert loss.item() == pytest.approx(0.5 * 0.1243504 / 8)


def test_dr_grpo_clipping_stops_gradient_outside_trust_region():
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), 0.5, requires_grad=True)  # ratio e^0.5 > 1.2
    loss = dr_grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), max_tokens=1, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.item() == 0.0


def test_bradley_terry_loss_of_trl_reward_trainer(tiny_lm, tmp_path):
    """TRL's RewardTrainer loss is -log sigmoid(r_chosen - r_rejected), the Bradley-Terry loss of both papers' RM stage."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.models import load_reward_model, rm_input_ids
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rm = load_reward_model(tmp_path / "m", tok)
    rows = [("post : alice lost the car . tldr :", "alice lost car", "bob"),
            ("post : bob sold the key . tldr :", "bob sold key", "key key key")]
    ds = Dataset.from_list([{"chosen_ids": rm_input_ids(tok, p, c), "rejected_ids": rm_input_ids(tok, p, r)} for p, c, r in rows])
    trainer = RewardTrainer(model=rm, processing_class=tok, train_dataset=ds,
                            args=RewardConfig(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True,
                                              per_device_train_batch_size=2))
    batch = trainer.data_collator([ds[0], ds[1]])
    loss = trainer.compute_loss(rm, batch)
    with torch.no_grad():
        from rlhf.rewards.proxy_rm import RewardScorer
        s = RewardScorer(rm, tok)
        rc = s([r[0] for r in rows], [r[1] for r in rows]).rewards
        rr = s([r[0] for r in rows], [r[2] for r in rows]).rewards
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(rc - rr).mean().item(), rel=1e-4)


def test_winrate_ci_counts_ties_half_and_covers_truth():
    assert winrate_ci([1, 0, 0.5, 0.5]) == pytest.approx((0.5, 0.0999240, 0.9000760))  # 0.5 ± 1.96 * 0.408 / 2
    assert winrate_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        _, lo, hi = winrate_ci(rng.random(256) < 0.6)
        covered += lo <= 0.6 <= hi
    assert 0.92 <= covered / 400 <= 0.98


def test_mean_ci_is_the_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert np.isnan(mean_ci([1.0])[1])
