"""report: the method x metric table (mean +- 95% CI over seeds) and the plots, under results/<exp>/report/.

Files:
  table.csv / table.md     one row per method: <metric>_mean, <metric>_ci (t interval half-width over seeds), n_seeds
  overoptimization.csv     one row per (method, seed): peak held-out win rate during training, its step,
                           final win rate, drop from peak, final proxy reward
  rewards_vs_step.png      proxy reward (train batches) and gold win rate (held-out) against the step
  gold_vs_kl.png           held-out gold win rate against KL from the initial policy
  diagnostics.png          gradient norm ||g1|| and sharpness against the step, on-policy BT loss against the
                           step and against ||g1||, on-policy proxy-RM accuracy against KL, SignCert's fraction with rho <= 0
  radius_validation.png    copied from the certify stage (sign robustness by decile of the certified radius)
  table.md                 also, with the mechanisms stage (mechanisms.method): each regularizer's signal on exploit vs
                           other completions and GR's realized perturbation (rlhf/mechanisms.py: markdown)
An RLVR experiment (its evaluations report accuracy, not win rate) gets the GR Table-3 shape instead:
  table.csv / table.md     per method (the base policy first): rule-checked accuracy and the training reward
                           (judge or rule terms) on the test questions, mean +- 95% CI over seeds; and per run the
                           peak held-out accuracy during training, the final one and the drop (judge hacking)
  accuracy_vs_step.png     training reward, held-out accuracy and the judge's correctness reward (the held-out
                           training reward for a rule reward) against the step
  difficulty.csv           where test questions carry type and level (MATH, the miniature): GR Table 4, accuracy per
                           difficulty bin at each evaluation step, per method (also in table.md)
"""
from __future__ import annotations

import shutil

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rlhf import mechanisms  # noqa: E402
from rlhf.difficulty import difficulty_by_method  # noqa: E402
from rlhf.figures import method_colour  # noqa: E402
from rlhf.io import atomic_dir, read_json, read_jsonl  # noqa: E402
from rlhf.stats import mean_ci, mean_ci_text  # noqa: E402

TABLE_METRICS = ["win_rate", "gold_reward", "proxy_reward", "kl", "length"]
RLVR_METRICS = ["accuracy", "reward", "reward/judge_correctness", "reward/correctness", "judge/unparseable_fraction",
                "length"]


def read_metrics(path) -> pd.DataFrame:
    df = pd.read_json(path, lines=True)
    return df.groupby("step", as_index=False).first()  # a step's train and eval lines are merged


def summarize(evals: pd.DataFrame, metrics=TABLE_METRICS) -> pd.DataFrame:
    rows = []
    for method, g in evals.groupby("method", sort=False):
        row = {"method": method, "n_seeds": len(g)}
        for m in metrics:
            if m in g:
                row[f"{m}_mean"], row[f"{m}_ci"] = mean_ci(g[m])
        rows.append(row)
    return pd.DataFrame(rows)


def overoptimization(curves: dict) -> pd.DataFrame:
    rows = []
    for (method, seed), df in curves.items():
        ev = df.dropna(subset=["eval/win_rate"])
        peak = ev.loc[ev["eval/win_rate"].idxmax()]
        final = ev.iloc[-1]
        rows.append({"method": method, "seed": seed, "peak_win_rate": peak["eval/win_rate"], "peak_step": int(peak["step"]),
                     "final_win_rate": final["eval/win_rate"], "drop_from_peak": peak["eval/win_rate"] - final["eval/win_rate"],
                     "final_proxy_reward": df["proxy_reward"].dropna().tail(10).mean()})
    return pd.DataFrame(rows)


def certify_markdown(folder) -> str:
    deciles, summary = pd.read_csv(folder / "deciles.csv"), read_json(folder / "summary.json")
    cols = [c for c in ("model_noise", "embedding_noise", "gold_agreement") if c in deciles]
    lines = ["", "Certified-radius validation (SFT-policy completions, proxy RM; rate of advantage signs preserved "
             "or agreeing with the gold, by decile of the radius):", "",
             "| decile | mean radius | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for _, r in deciles.iterrows():
        lines.append(f"| {int(r['bin']) + 1} | {r['radius_mean']:.4f} | {int(r['n'])} | " +
                     " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    # None where a correlation is undefined (a constant rate or radius: the paper rehearsal's gr-tldr-qwen2.5-0.5b)
    lines += ["", "Spearman correlation with the radius: " +
              ", ".join(f"{k.removeprefix('spearman_radius_')} {'undefined' if v is None else f'{v:.2f}'}"
                        for k, v in summary.items() if k.startswith("spearman"))]
    return "\n".join(lines) + "\n"


def _cell(row, m) -> str:
    return mean_ci_text(row.get(f"{m}_mean"), row.get(f"{m}_ci"))


def _table_lines(table: pd.DataFrame, metrics) -> list[str]:
    cols = [m for m in metrics if f"{m}_mean" in table]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['method']} | {row['n_seeds']} | " + " | ".join(_cell(row, m) for m in cols) + " |")
    return lines


def markdown(table: pd.DataFrame, over: pd.DataFrame) -> str:
    lines = _table_lines(table, TABLE_METRICS)
    lines += ["", "Mean ± half-width of the 95% t interval over seeds; win rate against the references, judged by the gold.",
              "", "Over-optimization during training (held-out prompts):", "",
              "| method | seed | peak win rate | at step | final win rate | drop | final proxy reward |",
              "|---|---|---|---|---|---|---|"]
    for _, r in over.iterrows():
        lines.append(f"| {r['method']} | {r['seed']} | {r['peak_win_rate']:.3f} | {r['peak_step']} | "
                     f"{r['final_win_rate']:.3f} | {r['drop_from_peak']:.3f} | {r['final_proxy_reward']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict, out) -> None:
    methods = list(dict.fromkeys(m for m, _ in curves))
    colors = {m: method_colour(m) for m in methods}  # the same in every figure
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, seed), df in curves.items():
        proxy = df.dropna(subset=["proxy_reward"])
        ax1.plot(proxy["step"], proxy["proxy_reward"].rolling(10, min_periods=1).mean(), color=colors[method],
                 alpha=0.8, label=_label_once(curves, method, seed))
        ev = df.dropna(subset=["eval/win_rate"])
        ax2.plot(ev["step"], ev["eval/win_rate"], color=colors[method], alpha=0.8, marker=".")
    ax1.set(xlabel="step", ylabel="proxy reward (train batch, smoothed)", title="Proxy reward")
    ax2.set(xlabel="step", ylabel="gold win rate vs reference (held-out)", title="Gold win rate")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards_vs_step.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (method, seed), df in curves.items():
        ev = df.dropna(subset=["eval/win_rate"])
        ax.plot(ev["eval/kl"], ev["eval/win_rate"], color=colors[method], alpha=0.8, marker=".",
                label=_label_once(curves, method, seed))
    ax.set(xlabel="KL(policy || initial) per completion", ylabel="gold win rate (held-out)", title="Gold vs KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=120)
    plt.close(fig)


def _label_once(curves: dict, method: str, seed) -> str | None:
    return method if seed == min(s for m, s in curves if m == method) else None


def plot_diagnostics(curves: dict, out) -> None:
    methods = list(dict.fromkeys(m for m, _ in curves))
    colors = {m: method_colour(m) for m in methods}  # the same in every figure
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (a_norm, a_sharp, a_bt), (a_bt_norm, a_acc, a_sc) = axes
    for (method, seed), df in curves.items():
        kw = dict(color=colors[method], alpha=0.8, label=_label_once(curves, method, seed))
        train = df.dropna(subset=["g1_norm"])
        smooth = train.set_index("step")["g1_norm"].rolling(10, min_periods=1).mean()
        a_norm.plot(smooth.index, smooth.values, **kw)
        if "sharpness" in df:
            sh = df.dropna(subset=["sharpness"])
            a_sharp.plot(sh["step"], sh["sharpness"], marker="o", **kw)
        if "onpolicy/bt_loss" in df:
            ev = df.dropna(subset=["onpolicy/bt_loss"])
            a_bt.plot(ev["step"], ev["onpolicy/bt_loss"], marker=".", **kw)
            a_bt_norm.scatter(smooth.reindex(ev["step"], method="nearest").values, ev["onpolicy/bt_loss"], s=12,
                              color=colors[method], alpha=0.7, label=kw["label"])
            a_acc.plot(ev["eval/kl"], ev["onpolicy/rm_accuracy"], marker=".", **kw)
        if "signcert/rho_negative" in df:
            z = df.dropna(subset=["signcert/rho_negative"])
            inside = z["signcert/rho_negative"] + z["signcert/rho_zero"]
            a_sc.plot(z["step"], inside.rolling(10, min_periods=1).mean(), **kw)
    a_norm.set(xlabel="step", ylabel="||g1|| (smoothed)", title="Gradient norm")
    a_sharp.set(xlabel="step", ylabel="max_i J(phi) - J(phi + e_i)", title="Sharpness")
    a_bt.set(xlabel="step", ylabel="BT loss of the proxy on policy samples", title="On-policy BT loss")
    a_bt_norm.set(xlabel="||g1|| (smoothed)", ylabel="on-policy BT loss", title="Gradient norm vs BT loss")
    a_acc.set(xlabel="KL(policy || initial)", ylabel="proxy accuracy vs gold (on-policy pairs)", title="Proxy accuracy vs KL")
    a_sc.set(xlabel="step", ylabel="fraction with rho <= 0 (smoothed)", title="SignCert: signs flipped or removed")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=110)
    plt.close(fig)


def hacking(curves: dict) -> pd.DataFrame:
    """RLVR: per run, the held-out accuracy's peak during training, the final one, the drop, the final train reward."""
    rows = []
    for (method, seed), df in curves.items():
        ev = df.dropna(subset=["eval/accuracy"])
        peak, final = ev.loc[ev["eval/accuracy"].idxmax()], ev.iloc[-1]
        rows.append({"method": method, "seed": seed, "initial_accuracy": ev.iloc[0]["eval/accuracy"],
                     "peak_accuracy": peak["eval/accuracy"], "peak_step": int(peak["step"]),
                     "final_accuracy": final["eval/accuracy"],
                     "drop_from_peak": peak["eval/accuracy"] - final["eval/accuracy"],
                     "final_train_reward": df["reward"].dropna().tail(10).mean()})
    return pd.DataFrame(rows)


def rlvr_markdown(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    lines = _table_lines(table, RLVR_METRICS)
    lines += ["", "Test questions, one sampled answer each; accuracy by the rule checker whatever the training reward; "
              "reward: the training reward (judge or rule terms) on the same answers. Mean ± half-width of the 95% t "
              "interval over seeds.", "", "During training (held-out questions):", "",
              "| method | seed | initial accuracy | peak | at step | final | drop | final train reward |",
              "|---|---|---|---|---|---|---|---|"]
    for _, r in runs.iterrows():
        lines.append(f"| {r['method']} | {r['seed']} | {r['initial_accuracy']:.3f} | {r['peak_accuracy']:.3f} | "
                     f"{r['peak_step']} | {r['final_accuracy']:.3f} | {r['drop_from_peak']:.3f} | "
                     f"{r['final_train_reward']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_rlvr(curves: dict, out) -> None:
    methods = list(dict.fromkeys(m for m, _ in curves))
    colors = {m: method_colour(m) for m in methods}  # the same in every figure
    judge = "eval/reward/judge_correctness"  # a judge-trained run: the judge's own score, beside the rule's accuracy
    third = judge if all(judge in df for df in curves.values()) else "eval/reward"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (method, seed), df in curves.items():
        train, ev = df.dropna(subset=["reward"]), df.dropna(subset=["eval/accuracy"])
        axes[0].plot(train["step"], train["reward"].rolling(10, min_periods=1).mean(), color=colors[method],
                     alpha=0.8, label=_label_once(curves, method, seed))
        axes[1].plot(ev["step"], ev["eval/accuracy"], color=colors[method], alpha=0.8, marker=".")
        axes[2].plot(ev["step"], ev[third], color=colors[method], alpha=0.8, marker=".")
    axes[0].set(xlabel="step", ylabel="training reward (train batch, smoothed)", title="Training reward")
    axes[1].set(xlabel="step", ylabel="accuracy by the rule checker (held-out)", title="Accuracy")
    axes[2].set(xlabel="step", ylabel=f"{third.removeprefix('eval/')} (held-out)",
                title="Judge's correctness reward" if "judge" in third else "Held-out training reward")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_step.png", dpi=120)
    plt.close(fig)


def difficulty(sft_eval, heldout: dict) -> pd.DataFrame | None:
    """The GR Table-4 difficulty table (rlhf/difficulty.py) when the test questions carry type and level (MATH, the
    RLVR miniature): bins from the SFT policy's own test evaluation, each run's held-out evaluations per step (its
    questions are the first of the test split, in order)."""
    rows = read_jsonl(sft_eval / "completions.jsonl")
    if not rows or not {"type", "level"} <= set(rows[0]):
        return None
    base = pd.DataFrame([{"question": i, "type": r["type"], "level": r["level"], "correct": bool(r["correct"])}
                         for i, r in enumerate(rows)])
    runs = {run: {r["step"]: pd.DataFrame({"question": range(len(r["correct"])), "correct": r["correct"]})
                  for r in read_jsonl(path)} for run, path in heldout.items()}
    return difficulty_by_method(base, runs)


def difficulty_markdown(table: pd.DataFrame) -> str:
    steps = [c for c in table.columns if isinstance(c, int)]
    lines = ["", "Accuracy by difficulty (GR Table 4): test questions grouped by type x level, groups binned by the SFT "
             "policy's accuracy on them; held-out accuracy of each bin at each evaluation step, mean over seeds:", "",
             "| method | bin (base accuracy %) | groups | questions | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|---|---|" + "---|" * len(steps)]
    for _, r in table.iterrows():
        cells = " | ".join("–" if pd.isna(r[s]) else f"{r[s]:.3f}" for s in steps)
        lines.append(f"| {r['method']} | {r['bin']} | {r['groups']} | {r['questions']} | {cells} |")
    return "\n".join(lines) + "\n"


def run(cfg, files, args):
    """inputs: `evals` (the SFT baseline's first, then one per GRPO run, then one per DPO-family run), `metrics` (the
    GRPO runs' training curves, in the order of their evals) and, for RLHF, `certify`."""
    evals = [read_json(folder / "metrics.json") for folder in files.inputs["evals"]]
    grpo_runs = evals[1:1 + len(files.inputs["metrics"])]  # then the DPO-family runs: evaluated, no training curves
    curves = {(e["method"], e["seed"]): read_metrics(path) for e, path in zip(grpo_runs, files.inputs["metrics"],
                                                                             strict=True)}
    folder = files.outputs["report"]
    if "accuracy" in evals[0]:  # an RLVR experiment
        table, runs = summarize(pd.DataFrame(evals), RLVR_METRICS), hacking(curves)
        bins = difficulty(files.inputs["evals"][0], dict(zip(curves, files.inputs["heldout"], strict=True)))
        with atomic_dir(folder) as out:
            table.to_csv(out / "table.csv", index=False)
            runs.to_csv(out / "hacking.csv", index=False)
            text = rlvr_markdown(table, runs)
            if bins is not None:
                bins.to_csv(out / "difficulty.csv", index=False)
                text += difficulty_markdown(bins)
            (out / "table.md").write_text(text)
            plot_rlvr(curves, out)
        print((folder / "table.md").read_text())
        return
    table, over = summarize(pd.DataFrame(evals)), overoptimization(curves)
    certify = files.inputs["certify"]
    text = markdown(table, over) + certify_markdown(certify)
    if "mechanisms" in files.inputs:  # the mechanisms stage's table, with GR's realized perturbation from its runs
        gr = {}
        for (method, _), c in curves.items():
            if "gr/realized_perturbation" in c and c["gr/realized_perturbation"].notna().any():
                gr.setdefault(method, []).append(float(c["gr/realized_perturbation"].mean()))
        text += mechanisms.markdown(read_json(files.inputs["mechanisms"] / "summary.json"), gr)
    with atomic_dir(folder) as out:
        table.to_csv(out / "table.csv", index=False)
        over.to_csv(out / "overoptimization.csv", index=False)
        shutil.copy(certify / "radius_validation.png", out / "radius_validation.png")
        (out / "table.md").write_text(text)
        plot_curves(curves, out)
        plot_diagnostics(curves, out)
    print((folder / "table.md").read_text())
