"""Reference values of the micro config's artifacts, stored in tests/expected/micro.json, that
tests/test_stages.py::test_micro_artifacts_match_the_stored_expectations compares a fresh micro run against.

Digits differ across CPUs (floating-point kernels, and sampling amplifies a changed token), so each value has a
tolerance wide enough for that and narrow enough that a broken stage (a flipped advantage sign, a lost label, an
untrained RM) lands outside it. After an intended change, regenerate and review the diff:

    python -m tests.expectations        # runs the micro pipeline in a temporary folder, rewrites micro.json
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

EXPECTED = Path(__file__).parent / "expected" / "micro.json"
METHODS = ["noreg", "kl", "resets", "gr", "signcert"]

# absolute tolerance by key prefix (the longest matching prefix wins); 0 = exact
TOLERANCE = {"data/": 0, "pairs/": 0, "rm/n_": 0, "rm/accuracy": 0.21, "rm/bt_loss": 0.02, "sft/": 0.05,
             "eval/": 0.15, "eval/n": 0, "eval/length": 1.0, "grpo/": 0.15, "grpo/steps": 0, "certify/": 0.2,
             "certify/completions": 0}


def measure(root: Path) -> dict[str, float]:
    """The numbers a micro run produced, flat."""
    read = lambda p: json.loads((root / p).read_text())  # noqa: E731
    lines = lambda p: [json.loads(x) for x in (root / p).read_text().splitlines()]  # noqa: E731
    out = {"data/train": len(lines("data/train.jsonl")), "data/test": len(lines("data/test.jsonl")),
           "pairs/samples": len(lines("pairs/samples.jsonl")), "pairs/labels": len(lines("pairs/labels.jsonl"))}
    labels = lines("pairs/labels.jsonl")
    out["pairs/gold_consistent"] = sum(r["gold_chosen"] > r["gold_rejected"] for r in labels)
    out["sft/train_loss"] = lines("sft/train_log.jsonl")[-1]["train_loss"]
    out.update({f"rm/{k}": v for k, v in read("rm/metrics.json").items()})
    for method in ["sft", *METHODS]:
        m = read(f"eval/{method}/seed0/metrics.json")
        out.update({f"eval/{k}/{method}": m[k] for k in ("win_rate", "gold_reward", "proxy_reward", "kl", "length", "n")})
    for method in METHODS:
        df = pd.read_json(root / "grpo" / method / "seed0" / "metrics.jsonl", lines=True)
        train = df.dropna(subset=["proxy_reward"])
        out[f"grpo/steps/{method}"] = len(train)
        out[f"grpo/proxy_reward_mean/{method}"] = train["proxy_reward"].mean()
        out[f"grpo/kl_last/{method}"] = train["kl"].iloc[-1]
        out[f"grpo/entropy_mean/{method}"] = train["entropy"].mean()
    sc = pd.read_json(root / "grpo" / "signcert" / "seed0" / "metrics.jsonl", lines=True).dropna(subset=["proxy_reward"])
    out["grpo/signcert_rho_negative_mean/signcert"] = sc["signcert/rho_negative"].mean()
    out.update({f"certify/{k}": v for k, v in read("certify/summary.json").items()})
    return {k: float(v) for k, v in out.items()}


def tolerance(key: str) -> float:
    return TOLERANCE[max((p for p in TOLERANCE if key.startswith(p)), key=len)]


def differences(got: dict, expected: dict) -> list[str]:
    """Every value outside its tolerance, every key missing on either side."""
    out = [f"{k}: missing from this run" for k in expected if k not in got]
    out += [f"{k}: not in {EXPECTED.name} (regenerate: python -m tests.expectations)" for k in got if k not in expected]
    out += [f"{k}: {got[k]:.4g}, expected {expected[k]:.4g} ± {tolerance(k):g}" for k in expected
            if k in got and not abs(got[k] - expected[k]) <= tolerance(k)]
    return out


def main() -> int:
    from tests.conftest import run_micro, write_config
    with tempfile.TemporaryDirectory() as tmp:
        root = run_micro(write_config(Path(tmp)))
        values = measure(root)
    EXPECTED.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(values)} values to {EXPECTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
