"""certify: does the certified radius predict sign robustness beyond its head-only assumption? (SignCert Fig. 4)

Completions of the SFT policy (G per prompt) are scored by the proxy RM; each gets its Dr.GRPO advantage and
certified radius. Per completion we measure how often the advantage sign survives (i) noise on every RM
parameter tensor and (ii) noise on the RM's input embeddings, and (iii) whether it agrees with the sign of the
gold advantage. Completions are binned into quantile bins (deciles) of the radius.

Outputs: certify/deciles.csv (bin, radius range and mean, n, each rate with its 95% CI),
certify/completions.jsonl, certify/summary.json (Spearman correlations), certify/radius_validation.png.
"""
from __future__ import annotations

import copy

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from rlhf.algorithms.advantages import dr_grpo_advantages  # noqa: E402
from rlhf.algorithms.signcert import certified_radius  # noqa: E402
from rlhf.generation import sample  # noqa: E402
from rlhf.io import atomic_dir, read_jsonl, write_json, write_jsonl  # noqa: E402
from rlhf.models import load_causal_lm, tokenizer_of  # noqa: E402
from rlhf.rewards.gold import make_gold  # noqa: E402
from rlhf.rewards.proxy_rm import RewardScorer, load_proxy  # noqa: E402
from rlhf.rng import DeviceNoise  # noqa: E402
from rlhf.settings import CertifySettings, ModelSettings  # noqa: E402
from rlhf.stages.common import setup  # noqa: E402

RATES = {"model_noise": "whole-model noise", "embedding_noise": "input-embedding noise", "gold_agreement": "agreement with gold"}


def _advantage_signs(rm, tokenizer, prompts, texts, G, batch_size) -> torch.Tensor:
    return dr_grpo_advantages(RewardScorer(rm, tokenizer, batch_size)(prompts, texts).rewards, G).sign()


@torch.no_grad()
def perturbed_model(rm, scale: float, noise: DeviceNoise):
    noisy = copy.deepcopy(rm)
    for p in noisy.parameters():
        p.copy_((p.float() + noise.like(p) * scale * p.float().std().nan_to_num(0.0)).to(p.dtype))
    return noisy


def embedding_noise_hook(scale: float, noise: DeviceNoise):
    def hook(module, inputs, output):
        return (output.float() + noise.like(output) * scale * output.float().std()).to(output.dtype)
    return hook


def decile_table(df: pd.DataFrame, bins: int) -> pd.DataFrame:
    df = df.assign(bin=pd.qcut(df["radius"], bins, labels=False, duplicates="drop"))
    rows = []
    for b, g in df.groupby("bin"):
        row = {"bin": int(b), "n": len(g), "radius_min": g["radius"].min(), "radius_max": g["radius"].max(),
               "radius_mean": g["radius"].mean()}
        for col in RATES:
            if col in g and g[col].notna().any():
                x = g[col].dropna()
                row[col], row[f"{col}_ci"] = x.mean(), 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path) -> None:
    fig, axes = plt.subplots(1, len([c for c in RATES if c in table]), figsize=(4.2 * 3, 3.6), squeeze=False)
    for ax, col in zip(axes[0], [c for c in RATES if c in table]):
        ax.errorbar(table["bin"] + 1, table[col], yerr=table[f"{col}_ci"], marker="o", capsize=3)
        ax.set(xlabel="decile of certified radius", ylabel="sign preserved / agreeing", title=RATES[col])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg, files, args):
    device = setup(cfg, args)
    c, inputs = CertifySettings.of(cfg), files.inputs
    G, bs = c.group_size, cfg["rm"]["batch_size_scoring"]
    rows = read_jsonl(inputs["test"], required=("prompt",))[: c.num_prompts]
    tokenizer = tokenizer_of(inputs["sft"], cfg)
    policy = load_causal_lm(inputs["sft"], ModelSettings.of(cfg).dtype, device)
    proxy = load_proxy(inputs["rm"], cfg, tokenizer, device)
    rm = proxy.model
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    texts = sample(policy, tokenizer, [r["prompt"] for r in rows], G, c.max_new_tokens, c.temperature).texts
    scores = proxy(prompts, texts)
    advantages = dr_grpo_advantages(scores.rewards, G)
    radius = certified_radius(advantages, scores.features, G)
    sign = advantages.sign()

    noise = DeviceNoise(cfg["seed"])
    model_kept, emb_kept = torch.zeros(len(texts)), torch.zeros(len(texts))
    for _ in range(c.noise_samples):
        model_kept += (_advantage_signs(perturbed_model(rm, c.model_noise, noise), tokenizer, prompts, texts, G, bs) == sign).float()
        handle = rm.get_input_embeddings().register_forward_hook(embedding_noise_hook(c.embedding_noise, noise))
        try:
            emb_kept += (_advantage_signs(rm, tokenizer, prompts, texts, G, bs) == sign).float()
        finally:
            handle.remove()
    df = pd.DataFrame({"prompt_index": np.repeat(np.arange(len(rows)), G), "completion": texts,
                       "reward": scores.rewards.numpy(), "advantage": advantages.numpy(), "radius": radius.numpy(),
                       "model_noise": (model_kept / c.noise_samples).numpy(),
                       "embedding_noise": (emb_kept / c.noise_samples).numpy()})
    gold_scores = make_gold(cfg, device).score(prompts, texts)
    if gold_scores is not None:
        gold_adv = dr_grpo_advantages(torch.tensor(gold_scores), G)
        df["gold_agreement"] = np.where(gold_adv.numpy() == 0, np.nan, (gold_adv.sign() == sign).float().numpy())
    group_std = scores.rewards.view(-1, G).std(1).repeat_interleave(G).numpy()
    kept = df[(group_std >= c.min_group_std) & (df["advantage"] != 0) & np.isfinite(df["radius"])]
    table = decile_table(kept, c.bins)
    summary = {"completions": len(df), "analyzed": len(kept)}
    for col in RATES:
        if col in kept and kept[col].notna().sum() > 2:
            x = kept.dropna(subset=[col])
            summary[f"spearman_radius_{col}"] = float(stats.spearmanr(x["radius"], x[col]).statistic)
    with atomic_dir(files.outputs["certify"]) as out:
        table.to_csv(out / "deciles.csv", index=False)
        write_jsonl(out / "completions.jsonl", df.to_dict("records"))
        write_json(out / "summary.json", summary)
        plot(table, out / "radius_validation.png")
    print(f"certify: {summary}")
