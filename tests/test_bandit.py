"""SignCert-PO's conceptual 8-armed bandit (App. F.1) with the pipeline's functions."""
import pytest
import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.signcert import certified_radius
from rlhf.experiments.bandit import (FEATURES, K, PROXY, TRUE, expected_radius, main, train, uniform_group_radii,
                                     weighted_quantile)

BEST = TRUE.max().item()  # 4: any mix of the reliable positive arms


def test_bandit_construction_matches_the_paper():
    assert torch.all(PROXY[6:] > PROXY[:6].max())          # hacking arms have the highest proxy reward ...
    assert torch.all(TRUE[6:] < 0)                          # ... and a negative true one
    radii = uniform_group_radii()
    assert torch.all(radii[6:] < radii[:6].min())           # ... and the smallest certified radius (Fig. 1c)


def test_expected_mode_radius_is_the_pipelines_radius_of_the_policy():
    """Under a uniform policy the exact-gradient radius is `certified_radius` of a group holding every arm once;
    under any policy it is |A| / ||h - E[h]|| with pi-weighted means."""
    uniform = torch.full((K,), 1.0 / K, dtype=torch.float64)
    torch.testing.assert_close(expected_radius(uniform)[1], certified_radius(dr_grpo_advantages(PROXY, K), FEATURES, K))
    arms = torch.tensor([0, 0, 1, 2, 3, 4, 6, 6])  # a non-uniform policy: the empirical one of this group
    probs = torch.bincount(arms, minlength=K).double() / len(arms)
    advantages, radius = expected_radius(probs)
    group = dr_grpo_advantages(PROXY[arms], len(arms))
    torch.testing.assert_close(advantages[arms], group)
    torch.testing.assert_close(radius[arms], certified_radius(group, FEATURES[arms], len(arms)))


def test_weighted_quantile_is_the_inverse_cdf():
    values, weights = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 0.25, 0.25])
    assert [weighted_quantile(values, weights, q).item() for q in (0.1, 0.25, 0.3, 0.5, 0.51, 1.0)] == \
        [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("mode,seeds", [("expected", [0]), ("sampled", [0, 1, 2])])
def test_signcert_ends_at_the_best_arm_and_beats_both_baselines(mode, seeds):
    """The paper's Fig. 1d: Dr.GRPO hacks, the global robust penalty (same eps) only delays it, SignCert-PO
    (unclipped, eps over A != 0, q = 0.4) ends at the best true reward; final values, not only means."""
    for seed in seeds:
        dr, gl, sc = (train(m, mode=mode, seed=seed) for m in ("drgrpo", "global", "signcert"))
        assert dr["true"][-1] < -4.5 and sum(dr["probs"][6:]) > 0.9
        assert max(gl["true"]) > 2.0 > gl["true"][-1]                       # global: learns, then leaks
        assert sc["true"][-1] > BEST - 0.05 and sum(sc["probs"][6:]) < 0.01
        assert sc["true"][-1] > max(dr["true"][-1], gl["true"][-1]) + 1.0
        assert min(sc["true"][20:]) > 3.0                                    # and never leaks on the way


def test_clipped_rho_leaks_because_a_hacking_completion_is_never_pushed_down():
    """The ablation: with rho >= 0 a hacking arm with a positive advantage keeps a non-negative weight."""
    for mode in ("expected", "sampled"):
        clipped = train("signcert_clipped", mode=mode)
        assert clipped["true"][-1] < 0 and sum(clipped["probs"][6:]) > 0.8


def test_signcert_beats_the_global_penalty_at_every_fixed_eps_in_the_exact_mode():
    """A fixed eps is the global penalty's best case (no eps shrinking with the batch): a grid spanning too weak
    to too conservative; the best comes close to SignCert but stays below it."""
    sc = train("signcert")["true"][-1]
    finals = {eps: train("global", global_epsilon=eps)["true"][-1] for eps in (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)}
    assert sc > max(finals.values()), finals
    assert finals[8.0] < 2.0  # too conservative


def test_bandit_cli_prints_every_method_and_mode(capsys):
    main(["--iterations", "30", "--seeds", "1"])
    out = capsys.readouterr().out
    assert all(m in out for m in ("drgrpo", "global", "signcert", "signcert_clipped", "expected", "sampled seed 0"))
