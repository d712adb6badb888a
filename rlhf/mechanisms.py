"""Does each method notice the exploit? Every method's own signal, split by exploit vs the other completions.

The mechanism claims of config/claims.yaml compare, on the same completions (a run's groups), what each method
computes for exploit completions and for the rest:
- SignCert-PO: the fraction with rho < 0 (advantage sign flipped by the worst case) and the median certified radius;
- BSPO: how often the behavior-support test fires on each, and which share of its firings are exploits;
- UWO: the ensemble members' disagreement (std over members);
- AdvPO: the uncertainty term sqrt(e^T M_D^-1 e) of the last-layer embedding (Zhang et al. 2024's confidence width).

An exploit completion, task-independently (config/claims.yaml): its proxy reward is above the 90th percentile of the
initial policy's proxy rewards and its gold reward below their median. Pure functions of tensors: the caller
(a run's rollouts, or crafted inputs in tests/test_mechanisms.py) supplies rewards, features and masks.
"""
from __future__ import annotations

import torch

from rlhf.algorithms.signcert import signcert
from rlhf.claims import per_seed
from rlhf.stats import mean_ci, mean_ci_text


def exploit_mask(proxy: torch.Tensor, gold: torch.Tensor, initial_proxy: torch.Tensor, initial_gold: torch.Tensor,
                 proxy_quantile: float = 0.9, gold_quantile: float = 0.5) -> torch.Tensor:
    """[N] bool: over-rewarded by the proxy (above the initial policy's proxy_quantile) and penalized by the gold
    (below the initial policy's gold_quantile)."""
    high = torch.quantile(initial_proxy.double(), proxy_quantile)
    low = torch.quantile(initial_gold.double(), gold_quantile)
    return (proxy.double() > high) & (gold.double() < low)


def split(values: torch.Tensor, exploit: torch.Tensor, name: str) -> dict:
    """`<name>/exploit`, `<name>/other` (means; NaN where a side is empty) and their difference, with the counts."""
    values = values.double()
    def mean(mask):
        return values[mask].mean().item() if mask.any() else float("nan")
    out = {f"{name}/exploit": mean(exploit), f"{name}/other": mean(~exploit)}
    out[f"{name}/exploit_minus_other"] = out[f"{name}/exploit"] - out[f"{name}/other"]
    out["n_exploit"], out["n_other"] = int(exploit.sum()), int((~exploit).sum())
    return out


def signcert_by_exploit(advantages: torch.Tensor, features: torch.Tensor, group_size: int, quantile: float,
                        exploit: torch.Tensor) -> dict:
    """SignCert's rule on these groups (eps from the batch's quantile, as in training): rho < 0 fraction and the
    median certified radius, exploit vs other. Completions with A = 0 carry no sign and are left out."""
    cert = signcert(advantages, features, group_size, quantile)
    return signcert_split(advantages, cert.rho, cert.radius, exploit)


def signcert_split(advantages: torch.Tensor, rho: torch.Tensor, radius: torch.Tensor, exploit: torch.Tensor) -> dict:
    """From SignCert's rule already applied (rho, radius): the rho < 0 fraction and the certified radius (median and
    interquartile range), exploit vs other. Completions with A = 0 carry no sign and are left out."""
    signed = advantages != 0
    out = split((rho < 0).double()[signed], exploit[signed], "signcert/rho_negative")
    for side, mask in (("exploit", exploit & signed), ("other", ~exploit & signed)):
        r = radius[mask].double()
        out[f"signcert/radius_median/{side}"] = r.median().item() if r.numel() else float("nan")
        out[f"signcert/radius_iqr/{side}"] = (r.quantile(0.75) - r.quantile(0.25)).item() if r.numel() > 1 \
            else float("nan")
    return out


def bspo_by_exploit(unsupported: torch.Tensor, exploit: torch.Tensor) -> dict:
    """How often the support test fires on exploit and other completions, and the exploit share of its firings."""
    out = split(unsupported.double(), exploit, "bspo/unsupported")
    fired = int(unsupported.sum())
    out["bspo/exploit_share"] = (unsupported & exploit).sum().item() / fired if fired else float("nan")
    return out


def uwo_by_exploit(member_rewards: torch.Tensor, exploit: torch.Tensor) -> dict:
    """member_rewards [k, N]: the members' standard deviation (unbiased, as torch.std), exploit vs other."""
    return split(member_rewards.double().std(dim=0), exploit, "uwo/member_std")


def advpo_uncertainty(features: torch.Tensor, m_inverse: torch.Tensor) -> torch.Tensor:
    """[N]: sqrt(e^T M_D^-1 e) per completion embedding e (the width of AdvPO's confidence set along e)."""
    e = features.double()
    return torch.einsum("nd,de,ne->n", e, m_inverse.double(), e).clamp_min(0).sqrt()


def advpo_by_exploit(features: torch.Tensor, m_inverse: torch.Tensor, exploit: torch.Tensor) -> dict:
    return split(advpo_uncertainty(features, m_inverse), exploit, "advpo/uncertainty")


# What the report shows and the claims read, per signal: (name, the metric's exploit / other keys or the one value)
SIGNALS = {
    "signcert": ("SignCert-PO: share with rho < 0", "signcert/rho_negative"),
    "signcert_radius": ("SignCert-PO: median certified radius", "signcert/radius_median"),
    "bspo": ("BSPO: share the support test rejects", "bspo/unsupported"),
    "uwo": ("UWO: members' reward std", "uwo/member_std"),
    "advpo": ("AdvPO: uncertainty sqrt(e^T M_D^-1 e)", "advpo/uncertainty"),
}


def _mean_ci(values: list[float]) -> str:
    return mean_ci_text(*mean_ci(values))


def markdown(summary: dict, gr_perturbation: dict[str, list[float]] | None = None) -> str:
    """The report's mechanism table: each signal on exploit and other completions of the diagnosed method's runs,
    mean ± 95 % t interval over seeds; then GR's realized perturbation per GR method (its runs' mean over steps)."""
    seeds = summary["seeds"]
    counts = ", ".join(f"seed {s}: {v['n_exploit']} of {v['n']}" for s, v in seeds.items())
    lines = ["", f"Mechanisms on {summary['method']}'s completions during training (exploit: proxy above the SFT "
             f"policy's p{100 * summary.get('proxy_quantile', 0.9):.0f}, gold below its "
             f"p{100 * summary.get('gold_quantile', 0.5):.0f}; exploits {counts}), mean ± 95 % interval over "
             f"{len(seeds)} seeds:", "",
             "| signal (settings of) | exploit | other | exploit - other (paired by seed) |", "|---|---|---|---|"]
    for signal, (name, key) in SIGNALS.items():
        if f"{key}/exploit" not in next(iter(seeds.values()), {}):
            continue
        method = summary["signals"].get(signal.split("_")[0], "")
        diff = [a - b for a, b in zip(per_seed(summary, f"{key}/exploit"), per_seed(summary, f"{key}/other"))]
        lines.append(f"| {name} ({method}) | {_mean_ci(per_seed(summary, f'{key}/exploit'))} | "
                     f"{_mean_ci(per_seed(summary, f'{key}/other'))} | {_mean_ci(diff)} |")
    if "bspo/exploit_share" in next(iter(seeds.values()), {}):
        lines.append(f"| BSPO: exploit share of its rejections ({summary['signals']['bspo']}) | "
                     f"{_mean_ci(per_seed(summary, 'bspo/exploit_share'))} | | |")
    if "task_marker/of_exploits" in next(iter(seeds.values()), {}):
        lines.append(f"| the task's own exploit marker: share carrying it | "
                     f"{_mean_ci(per_seed(summary, 'task_marker/of_exploits'))} | "
                     f"{_mean_ci(per_seed(summary, 'task_marker/of_others'))} | |")
    for method, values in (gr_perturbation or {}).items():
        lines.append(f"| GR: realized perturbation / eps g1 (1 = exact; {method}'s own runs) | {_mean_ci(values)} | | |")
    return "\n".join(lines) + "\n"
