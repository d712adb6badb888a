"""SignCert-PO's conceptual 8-armed bandit (App. F.1) with the pipeline's own functions."""
import torch

from rlhf.experiments.bandit import PROXY, TRUE, main, train, uniform_group_radii


def test_bandit_construction_matches_the_paper():
    assert torch.all(PROXY[6:] > PROXY[:6].max())          # hacking arms have the highest proxy reward ...
    assert torch.all(TRUE[6:] < 0)                          # ... and a negative true one
    radii = uniform_group_radii()
    assert torch.all(radii[6:] < radii[:6].min())           # ... and the smallest certified radius (Fig. 1c)


def test_drgrpo_hacks_and_signcert_resists():
    for seed in range(3):
        dr, sc = train("drgrpo", seed=seed), train("signcert", quantile=0.5, seed=seed)
        assert dr["true"][-1] < -4 and sum(dr["probs"][6:]) > 0.9          # Dr.GRPO converges on the hacking arms
        assert max(sc["true"][:100]) > 1.0                                   # SignCert first learns the reliable arms
        assert sum(sc["true"]) / len(sc["true"]) > sum(dr["true"]) / len(dr["true"]) + 3


def test_bandit_cli_prints_both_methods(capsys):
    main(["--iterations", "30"])
    out = capsys.readouterr().out
    assert "drgrpo" in out and "signcert" in out
