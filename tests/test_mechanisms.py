"""The mechanism diagnostics (rlhf/mechanisms.py) on crafted inputs whose answer is known by construction."""
import math

import pytest
import torch

from rlhf.algorithms.advpo import precision_inverse
from rlhf.mechanisms import (advpo_by_exploit, advpo_uncertainty, bspo_by_exploit, exploit_mask,
                                        signcert_by_exploit, split, uwo_by_exploit)


def test_exploit_mask_needs_both_a_high_proxy_and_a_low_gold():
    initial_proxy, initial_gold = torch.arange(10.0), torch.arange(10.0)  # p90 = 8.1, median = 4.5
    proxy = torch.tensor([9.0, 9.0, 5.0, 5.0])
    gold = torch.tensor([1.0, 8.0, 1.0, 8.0])
    assert exploit_mask(proxy, gold, initial_proxy, initial_gold).tolist() == [True, False, False, False]


def test_split_means_each_side_and_says_nan_for_an_empty_side():
    out = split(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([False, False, True]), "x")
    assert (out["x/exploit"], out["x/other"], out["x/exploit_minus_other"]) == (10.0, 2.0, 8.0)
    assert (out["n_exploit"], out["n_other"]) == (1, 2)
    assert math.isnan(split(torch.ones(2), torch.zeros(2, dtype=torch.bool), "x")["x/exploit"])


def _groups(n_groups: int = 4, size: int = 8):
    """Groups whose last completion is an exploit: a feature-space outlier among the group's best-rewarded; the others
    sit close together. The outlier's distance to the group mean is (size - 1) times theirs, so at equal |A| its
    certified radius |A| / ||h - h_bar|| is the smallest of its group by that factor."""
    torch.manual_seed(0)
    features, advantages, exploit = [], [], []
    for _ in range(n_groups):
        h = 0.01 * torch.randn(size, 8)
        h[-1] += 5.0                                  # the outlier
        r = torch.tensor([0.0] * (size // 2) + [1.0] * (size // 2))
        features.append(h)
        advantages.append(r - r.mean())
        exploit.append(torch.tensor([False] * (size - 1) + [True]))
    return torch.cat(advantages), torch.cat(features), torch.cat(exploit)


def test_signcert_flips_the_outliers_and_keeps_the_rest():
    advantages, features, exploit = _groups()
    out = signcert_by_exploit(advantages, features, group_size=8, quantile=0.125, exploit=exploit)
    assert out["signcert/rho_negative/exploit"] == 1.0
    assert out["signcert/rho_negative/other"] == 0.0
    assert out["signcert/radius_median/exploit"] < out["signcert/radius_median/other"]


def test_signcert_leaves_zero_advantages_out():
    advantages, features, exploit = _groups()
    advantages[exploit] = 0.0   # the outliers carry no sign: nothing to certify, nothing counted
    out = signcert_by_exploit(advantages, features, group_size=8, quantile=0.125, exploit=exploit)
    assert out["n_exploit"] == 0 and math.isnan(out["signcert/rho_negative/exploit"])


def test_bspo_exploit_share_of_its_firings():
    unsupported = torch.tensor([True, True, True, False, False, True])
    exploit = torch.tensor([True, True, True, True, False, False])
    out = bspo_by_exploit(unsupported, exploit)
    assert out["bspo/exploit_share"] == pytest.approx(3 / 4)
    assert out["bspo/unsupported/exploit"] == pytest.approx(3 / 4)
    assert out["bspo/unsupported/other"] == pytest.approx(1 / 2)
    assert math.isnan(bspo_by_exploit(torch.zeros(3, dtype=torch.bool), exploit[:3])["bspo/exploit_share"])


def test_uwo_members_disagree_on_the_exploit():
    members = torch.tensor([[1.0, 1.0, 3.0], [1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])  # [k=3, N=3]
    out = uwo_by_exploit(members, torch.tensor([False, False, True]))
    assert out["uwo/member_std/other"] == 0.0
    assert out["uwo/member_std/exploit"] == pytest.approx(2.0)


def test_advpo_uncertainty_is_large_off_the_rm_data_and_matches_the_formula():
    # RM training features span the first axis only: along the second the confidence set is as wide as the ridge allows
    data = torch.zeros(50, 2)
    data[:, 0] = torch.linspace(-3, 3, 50)
    m_inv = precision_inverse(data, data, ridge=1.0)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = advpo_uncertainty(e, m_inv)
    expected = torch.sqrt(torch.einsum("nd,de,ne->n", e.double(), m_inv.double(), e.double()))
    assert torch.allclose(u, expected)
    out = advpo_by_exploit(e, m_inv, torch.tensor([False, True]))
    assert out["advpo/uncertainty/exploit"] == pytest.approx(1.0)   # ridge 1, no data along that axis
    assert out["advpo/uncertainty/other"] < 0.2


def test_the_stage_applies_signcert_per_logged_step_and_pools_each_signal_over_the_steps():
    """Two logged steps of the crafted groups: SignCert's rule runs on each step's batch (the outliers flipped at each);
    pooled, every signal is the split of all completions, and each step's own split is kept."""
    from rlhf.stages.mechanisms import diagnose, signals
    advantages, features, exploit = _groups()
    n = len(exploit)
    members = torch.stack([torch.zeros(n), torch.where(exploit, 2.0, 0.0)])  # the members disagree on the outliers
    step = {"exploit": exploit, "advantages": advantages, "features": features, "members": members,
            "unsupported": exploit.clone(), "m_inverse": torch.eye(8)}
    out = diagnose({2: step, 4: step}, group_size=8, rule={"quantile": 0.125})
    assert (out["n"], out["n_exploit"], out["n_other"]) == (2 * n, 8, 2 * n - 8)
    assert out["signcert/rho_negative/exploit"] == 1.0 and out["signcert/rho_negative/other"] == 0.0
    assert out["signcert/radius_median/exploit"] < out["signcert/radius_median/other"]
    assert out["bspo/exploit_share"] == 1.0 and out["uwo/member_std/exploit"] == pytest.approx(2 ** 0.5)
    assert out["advpo/uncertainty/exploit"] > out["advpo/uncertainty/other"]  # the outliers' features are 5 away
    assert sorted(out["steps"]) == [2, 4] and out["steps"][2]["n"] == n
    assert signals({k: v for k, v in step.items()})["uwo/member_std/other"] == 0.0
    assert "signcert/rho_negative/exploit" not in diagnose({2: step}, group_size=8, rule=None)


def test_the_task_marker_is_reported_beside_the_claims_exploit_definition():
    """On the out-of-distribution miniature a completion with more marks than the gold likes is the task's exploit; the
    stage reports which share of each side (the claims' exploit definition, the rest) carries that marker."""
    from rlhf.config import load_config
    from rlhf.stages.mechanisms import signals, task_marker
    from tests.conftest import REPO
    cfg = load_config(REPO / "config" / "miniature-ood.yaml")
    marker, liked = task_marker(cfg), cfg["data"]["miniature"]["emphasis_liked"]
    assert marker("bob lost ring " + "! " * (liked + 1)) and not marker("bob lost ring " + "! " * liked)
    assert task_marker(load_config(REPO / "config" / "miniature.yaml")) is None
    exploit = torch.tensor([True, True, False, False])
    out = signals({"exploit": exploit, "task_exploit": torch.tensor([True, False, False, False])})
    assert (out["task_marker/of_exploits"], out["task_marker/of_others"], out["task_marker/share"]) == (0.5, 0.0, 0.25)
