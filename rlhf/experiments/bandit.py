"""SignCert-PO's conceptual experiment (App. F.1, Fig. 1): an 8-armed bandit where Dr.GRPO hacks the proxy.

Each arm has a fixed feature vector h (d = 6); proxy and true reward are linear heads on the same features.
Dimensions 0-2 are shared (both heads weight 4); dimensions 3-5 diverge (proxy +0.5, true -0.5).
Arms 1-3 are reliable positives (+4 under both), arms 4-6 reliable negatives (-4), arms 7-8 are hacking
arms: feature-space outliers (10 on a divergent dimension) with the best proxy reward (+5) and a negative
true one (-5). The paper's exact numbers are not in our copy; these reproduce its described structure.
The policy is a softmax over the arms, initialized uniform.

Two modes:
  expected  the paper's ("we use the exact expected policy gradient"): every arm weighted by its probability,
            A_a = r_a - E_pi[r], h_bar = E_pi[h], eps the pi-weighted quantile of the radii (inverse CDF).
  sampled   each iteration samples B groups of G arms and uses `dr_grpo_advantages` and `signcert` exactly as the
            GRPO stage does, so the experiment exercises the pipeline's functions.
Methods: Dr.GRPO; the global robust penalty of SC section 3.3 (one head perturbation shared by all completions:
max_{||delta|| <= eps} of the expected reward under w + delta gives the advantage A_j - eps * u^T (h_j - h_bar) with
u = E[h] / ||E[h]||, Lemma 3.3), with the same eps as SignCert so that only per-completion vs shared differs;
SignCert-PO (unclipped rho, the paper's derivation) and its clipped ablation.

    python -m rlhf.experiments.bandit [--iterations 300] [--quantile 0.4] [--seeds 3]
"""
from __future__ import annotations

import argparse

import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.signcert import certified_radius, signcert

K, D = 8, 6
FEATURES = torch.zeros(K, D, dtype=torch.float64)
for i in range(3):
    FEATURES[i, i] = 1.0        # reliable positive arms
    FEATURES[3 + i, i] = -1.0   # reliable negative arms
FEATURES[6, 3] = 10.0           # hacking arms: outliers in the divergent dimensions
FEATURES[7, 4] = 10.0
PROXY_HEAD = torch.tensor([4.0, 4.0, 4.0, 0.5, 0.5, 0.5], dtype=torch.float64)
TRUE_HEAD = torch.tensor([4.0, 4.0, 4.0, -0.5, -0.5, -0.5], dtype=torch.float64)
PROXY, TRUE = FEATURES @ PROXY_HEAD, FEATURES @ TRUE_HEAD
QUANTILE = 0.4  # SignCert's q here, in the CLI and in the tests (the paper's best for Pythia-1B)
METHODS = ("drgrpo", "global", "signcert", "signcert_clipped")
MODES = ("expected", "sampled")


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of the distribution putting mass `weights` on `values` (inverse CDF)."""
    if values.numel() == 0:
        return values.new_zeros(())
    order = torch.argsort(values)
    cdf = torch.cumsum(weights[order], 0) / weights.sum()
    return values[order][torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp_max(len(values) - 1)]


def expected_radius(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_a, Delta_a) of every arm under the policy: A_a = r_a - E[r], Delta_a = |A_a| / ||h_a - E[h]||."""
    advantages = PROXY - probs @ PROXY
    deviation = (FEATURES - probs @ FEATURES).norm(dim=1)
    radius = advantages.abs() / deviation.clamp_min(torch.finfo(deviation.dtype).tiny)
    radius = torch.where(deviation == 0, torch.full_like(radius, float("inf")), radius)
    return advantages, torch.where(advantages == 0, torch.zeros_like(radius), radius)


def _expected_weights(method: str, probs: torch.Tensor, quantile: float, global_epsilon: float | None) -> torch.Tensor:
    advantages, radius = expected_radius(probs)
    eps = weighted_quantile(radius[advantages != 0], probs[advantages != 0], quantile)
    if method == "drgrpo":
        return advantages
    if method == "global":
        h_bar = probs @ FEATURES
        eps = eps if global_epsilon is None else global_epsilon
        return advantages - eps * (FEATURES - h_bar) @ (h_bar / h_bar.norm().clamp_min(1e-12))
    rho = torch.where(radius == 0, torch.zeros_like(radius), 1 - eps / radius)  # radius inf -> rho 1
    return (rho.clamp_min(0) if method == "signcert_clipped" else rho) * advantages


def _sampled_gradient(method: str, probs: torch.Tensor, arms: torch.Tensor, group_size: int, quantile: float,
                      global_epsilon: float | None) -> torch.Tensor:
    advantages = dr_grpo_advantages(PROXY[arms], group_size)
    if method != "drgrpo":
        h = FEATURES[arms]
        cert = signcert(advantages, h, group_size, quantile, clip_negative=method == "signcert_clipped")
        if method == "global":
            grouped = h.view(-1, group_size, D)
            centered = (grouped - grouped.mean(1, keepdim=True)).view(-1, D)
            mean = h.mean(0)
            eps = cert.epsilon if global_epsilon is None else global_epsilon
            advantages = advantages - eps * centered @ (mean / mean.norm().clamp_min(1e-12))
        else:
            advantages = cert.rho * advantages
    # REINFORCE with the group-mean baseline: grad log softmax(a) = onehot(a) - probs
    return (advantages.unsqueeze(1) * (torch.nn.functional.one_hot(arms, K) - probs)).mean(0)


def train(method: str, *, mode: str = "expected", iterations: int = 300, groups: int = 16, group_size: int = 8,
          lr: float = 0.5, quantile: float = QUANTILE, global_epsilon: float | None = None, seed: int = 0) -> dict:
    """Returns the expected proxy and true reward per iteration and the final arm probabilities.
    global_epsilon: the global penalty's fixed eps (None: SignCert's eps of the same batch)."""
    if method not in METHODS or mode not in MODES:
        raise ValueError(f"method must be one of {METHODS} and mode one of {MODES}")
    generator = torch.Generator().manual_seed(seed)
    logits = torch.zeros(K, dtype=torch.float64)
    proxy_curve, true_curve = [], []
    for _ in range(iterations):
        probs = torch.softmax(logits, 0)
        proxy_curve.append(float(probs @ PROXY))
        true_curve.append(float(probs @ TRUE))
        if mode == "expected":
            weights = _expected_weights(method, probs, quantile, global_epsilon)
            grad = probs * (weights - probs @ weights)  # sum_a pi_a w_a grad log pi_a, w.r.t. the logits
        else:
            arms = torch.multinomial(probs, groups * group_size, replacement=True, generator=generator)
            grad = _sampled_gradient(method, probs, arms, group_size, quantile, global_epsilon)
        logits = logits + lr * grad
    return {"proxy": proxy_curve, "true": true_curve, "probs": torch.softmax(logits, 0).tolist()}


def uniform_group_radii() -> torch.Tensor:
    """Certified radius of each arm in a group holding every arm once (Fig. 1c)."""
    return certified_radius(dr_grpo_advantages(PROXY, K), FEATURES, K)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--quantile", type=float, default=QUANTILE)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the sampled mode (the expected mode has no noise)")
    args = p.parse_args(argv)
    print("certified radius per arm (uniform group):", [round(x, 3) for x in uniform_group_radii().tolist()])
    marks = sorted({0, 20, 50, 100, 200, args.iterations - 1} & set(range(args.iterations)))
    print(f"q = {args.quantile}; expected true reward at iteration " + ", ".join(map(str, marks))
          + "; mean over training; final P(hacking arms)")
    for mode in MODES:
        for seed in range(1 if mode == "expected" else args.seeds):
            for method in METHODS:
                r = train(method, mode=mode, iterations=args.iterations, quantile=args.quantile, seed=seed)
                curve = " ".join(f"{r['true'][i]:6.2f}" for i in marks)
                mean = sum(r["true"]) / len(r["true"])
                name = f"{mode}{'' if mode == 'expected' else f' seed {seed}'}"
                print(f"{name:<16} {method:<17} {curve}   mean {mean:6.2f}   P(hack) {sum(r['probs'][6:]):.3f}")


if __name__ == "__main__":
    main()
