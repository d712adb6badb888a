"""SignCert-PO's conceptual experiment (App. F.1, Fig. 1): an 8-armed bandit where Dr.GRPO hacks the proxy.

Each arm has a fixed feature vector h (d = 6); proxy and true reward are linear heads on the same features.
Dimensions 0-2 are shared (both heads weight 4); dimensions 3-5 diverge (proxy +0.5, true -0.5).
Arms 1-3 are reliable positives (+4 under both), arms 4-6 reliable negatives (-4), arms 7-8 are hacking
arms: feature-space outliers (10 on a divergent dimension) with the best proxy reward (+5) and a negative
true one (-5). The paper's exact numbers are not in our copy; these reproduce its described structure.

The policy is a softmax over the arms, initialized uniform. Unlike the paper (exact expected gradient),
each iteration samples B groups of G arms and uses `dr_grpo_advantages` and `signcert_weights` exactly as
the GRPO stage does, so the experiment exercises the pipeline's functions.

    python -m rlhf.experiments.bandit [--iterations 300] [--quantile 0.25] [--seed 0]
"""
from __future__ import annotations

import argparse

import torch

from rlhf.algorithms.advantages import dr_grpo_advantages
from rlhf.algorithms.signcert import certified_radius, signcert_weights

K, D = 8, 6
FEATURES = torch.zeros(K, D)
for i in range(3):
    FEATURES[i, i] = 1.0        # reliable positive arms
    FEATURES[3 + i, i] = -1.0   # reliable negative arms
FEATURES[6, 3] = 10.0           # hacking arms: outliers in the divergent dimensions
FEATURES[7, 4] = 10.0
PROXY_HEAD = torch.tensor([4.0, 4.0, 4.0, 0.5, 0.5, 0.5])
TRUE_HEAD = torch.tensor([4.0, 4.0, 4.0, -0.5, -0.5, -0.5])
PROXY, TRUE = FEATURES @ PROXY_HEAD, FEATURES @ TRUE_HEAD


def train(method: str, *, iterations: int = 300, groups: int = 16, group_size: int = 8, lr: float = 0.5,
          quantile: float = 0.25, seed: int = 0) -> dict:
    """Returns the expected proxy and true reward per iteration and the final arm probabilities."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.zeros(K)
    proxy_curve, true_curve = [], []
    for _ in range(iterations):
        probs = torch.softmax(logits, 0)
        proxy_curve.append(float(probs @ PROXY))
        true_curve.append(float(probs @ TRUE))
        arms = torch.multinomial(probs, groups * group_size, replacement=True, generator=generator)
        advantages = dr_grpo_advantages(PROXY[arms], group_size)
        if method == "signcert":
            advantages = signcert_weights(advantages, FEATURES[arms], group_size, quantile) * advantages
        # REINFORCE with the group-mean baseline: grad log softmax(a) = onehot(a) - probs
        grad = (advantages.unsqueeze(1) * (torch.nn.functional.one_hot(arms, K) - probs)).mean(0)
        logits = logits + lr * grad
    return {"proxy": proxy_curve, "true": true_curve, "probs": torch.softmax(logits, 0).tolist()}


def uniform_group_radii() -> torch.Tensor:
    """Certified radius of each arm in a group holding every arm once (Fig. 1c)."""
    return certified_radius(dr_grpo_advantages(PROXY, K), FEATURES, K)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--quantile", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("certified radius per arm (uniform group):", [round(x, 3) for x in uniform_group_radii().tolist()])
    marks = sorted({0, 20, 50, 100, 200, args.iterations - 1} & set(range(args.iterations)))
    print("expected true reward at iteration " + ", ".join(map(str, marks)) + "; mean over training; final P(hacking arms)")
    for method in ("drgrpo", "signcert"):
        r = train(method, iterations=args.iterations, quantile=args.quantile, seed=args.seed)
        curve = " ".join(f"{r['true'][i]:6.2f}" for i in marks)
        mean = sum(r["true"]) / len(r["true"])
        print(f"{method:<9} {curve}   mean {mean:6.2f}   P(hack) {sum(r['probs'][6:]):.3f}")


if __name__ == "__main__":
    main()
