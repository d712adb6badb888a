import json
import subprocess
import sys

import pytest

from rlhf.cli import main
from rlhf.stages.bench import cpu_has_bf16, like_for_like, markdown
from tests.conftest import REPO


def test_bench_times_ours_and_trl_on_the_same_work(micro_run, capsys):
    """(HF vs vLLM sampling: tests/test_vllm.py; the micro model's head_dim 16 is not one vLLM's CPU kernels take.)"""
    cfg, root = micro_run
    assert main(["bench", "--config", str(cfg), "--warmup", "1", "--timed", "2", "--no-vllm", "--repeats", "2"]) == 0
    result = json.loads((root / "bench" / "bench.json").read_text())
    rounds, ratios = result["rounds"], result["ratios"]
    # a ratio pairs the rows of one round: its values, median and range are those of the rounds' own ratios
    gr = [a["update"] / b["update"] for a, b in zip(rounds["gr"], rounds["noreg"])]
    assert len(gr) == 2 and ratios["gr_update / noreg_update"]["values"] == gr
    assert ratios["gr_update / noreg_update"]["median"] == pytest.approx(sum(gr) / 2)
    assert ratios["gr_update / noreg_update"]["min"] == min(gr) and ratios["gr_update / noreg_update"]["max"] == max(gr)
    sc = [a["step"] / b["step"] for a, b in zip(rounds["signcert"], rounds["drgrpo_same_kl"])]
    assert ratios["signcert_step / drgrpo_same_kl_step"]["values"] == sc
    # on the same work: Dr.GRPO's step plus SignCert's own advantages' extra seconds (its worst case and statistics)
    same = [1 + (a["advantages"] - b["advantages"]) / b["step"]
            for a, b in zip(rounds["signcert"], rounds["drgrpo_same_kl"])]
    assert ratios["signcert_step / drgrpo_same_kl_step, same work"]["values"] == same
    assert all(0 < r["advantages"] < r["update"] and r["length"] > 0 for r in rounds["signcert"] + rounds["noreg"])
    assert result["results"]["noreg"]["step"] == pytest.approx(sum(r["step"] for r in rounds["noreg"]) / 2)
    assert all(r["step_cpu"] > 0 for rows in rounds.values() for r in rows if "step_cpu" in r)
    # SignCert against Dr.GRPO as SignCert Table 2 runs it: the same KL term (micro: beta 0.01), no radius
    assert rounds["signcert"][0]["work"]["reference_forward"] and rounds["drgrpo_same_kl"][0]["work"]["reference_forward"]
    precisions = ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])
    for dtype in precisions:  # what each side actually ran, read back from the trainers, is the same
        ours, trl = (result["results"][f"{name} ({dtype})"]["work"] for name in ("noreg_without_kl_metric", "trl_grpotrainer"))
        assert ours == trl and ours["weights"] == dtype and ours["autocast"] is None
        assert ours["completions_per_step"] == 2 * 4 and not ours["reference_forward"]  # micro: B=2, G=4
    assert set(ratios) == {"gr_update / noreg_update", "gr_hvp_update / noreg_update", "signcert_step / noreg_step",
                           "signcert_step / drgrpo_same_kl_step", "signcert_step_cpu / drgrpo_same_kl_step_cpu",
                           "signcert_step / drgrpo_same_kl_step, same work", "elastic_reset_step / noreg_step",
                           "uwo_step / noreg_step", "advpo_step / noreg_step", "bspo_step / noreg_step", *(f"ours_step / trl_step ({p}, same work)" for p in precisions)}
    assert result["not_comparable"] == {}
    out = capsys.readouterr().out
    assert all(f"| {k} | {v['median']:.3f} | {v['min']:.3f}-{v['max']:.3f} |" in out for k, v in ratios.items())


def test_bench_times_only_the_rows_asked_for(micro_run, capsys):
    """--methods: one ratio's two rows, so that it can get many rounds; a name that is no row is refused."""
    cfg, root = micro_run
    assert main(["bench", "--config", str(cfg), "--warmup", "0", "--timed", "1", "--no-vllm", "--repeats", "3",
                 "--methods", "signcert", "drgrpo_same_kl"]) == 0
    result = json.loads((root / "bench" / "bench.json").read_text())
    assert set(result["rounds"]) == {"signcert", "drgrpo_same_kl"} and result["methods"] == ["drgrpo_same_kl", "signcert"]
    assert set(result["ratios"]) == {"signcert_step / drgrpo_same_kl_step", "signcert_step_cpu / drgrpo_same_kl_step_cpu",
                                     "signcert_step / drgrpo_same_kl_step, same work"}
    assert len(result["ratios"]["signcert_step / drgrpo_same_kl_step"]["values"]) == 3
    assert main(["bench", "--config", str(cfg), "--no-vllm", "--methods", "signcrt"]) == 2
    assert "bench: --methods signcrt: no such row (choose from noreg, gr," in capsys.readouterr().err


def test_bench_refuses_a_ratio_for_different_work():
    """TRL's own default (bf16 autocast) against ours in fp32, or ours logging KL: named, and no number."""
    work = {"weights": "float32", "autocast": None, "completions_per_step": 64, "max_new_tokens": 20,
            "reference_forward": False}
    ours, trl = {"step": 0.5, "work": work}, {"step": 5.0, "work": {**work, "autocast": "bf16"}}
    assert like_for_like(ours, trl) == "autocast: ours None vs TRL bf16"
    assert like_for_like({**ours, "work": {**work, "reference_forward": True}}, {**ours}) == \
        "reference_forward: ours True vs TRL False"
    assert like_for_like(ours, {"step": 1.0, "work": dict(work)}) is None
    text = markdown({}, {}, _settings(), 1, not_comparable={"ours_step / trl_step (float32, same work)": "autocast"})
    assert "| ours_step / trl_step (float32, same work) | not the same work: autocast | – | – |" in text


def _settings():
    from rlhf.config import load_config
    from rlhf.settings import GRPOSettings
    return GRPOSettings(**load_config(REPO / "config" / "micro.yaml")["grpo"])


def test_the_memory_bench_attributes_each_methods_extra_memory(tmp_path):
    """`python -m rlhf.experiments.memory_bench` at a 2M-parameter shape in fp32 (N parameters, 4 N bytes): UWO holds two
    reward models more than noreg, Reference Resets pi_ref and Elastic Reset its fp32 EMA (4 N each), GR's finite
    difference adds g1 and the saved weights to the step (8 N), each within 15 %. With --timed: each method's update
    seconds in every round (rounds apart: fresh processes), its ratio to noreg's paired per round."""
    done = subprocess.run([sys.executable, "-m", "rlhf.experiments.memory_bench", "--shape", "small", "--dtype",
                           "float32", "--threads", "1", "--rows", "8", "--prompt", "32", "--completion", "16",
                           "--methods", "noreg", "gr", "uwo", "elastic", "--out", str(tmp_path), "--timed", "1", "--repeats", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "memory.json").read_text())["results"]
    n4 = 4 * r["noreg"]["params"]
    held = {m: v["parts"]["held models"] for m, v in r.items()}
    step = {m: v["parts"]["step"] for m, v in r.items()}
    assert (held["uwo"] - held["noreg"]) / n4 == pytest.approx(2, rel=0.15)
    assert (held["elastic"] - held["noreg"]) / n4 == pytest.approx(1, rel=0.15)
    assert (step["gr"] - step["noreg"]) / n4 == pytest.approx(2, rel=0.15)
    assert all(v["peak"] >= sum(v["parts"].values()) * 0.99 for v in r.values())
    assert all(len(v["rounds"]) == 2 and v["update_s"] > 0 for v in r.values())
    assert r["noreg"]["time_ratio"]["values"] == [1.0, 1.0]
    gr = r["gr"]["time_ratio"]
    assert gr["values"] == [a["update_s"] / b["update_s"] for a, b in zip(r["gr"]["rounds"], r["noreg"]["rounds"])]
    assert gr["min"] <= gr["median"] <= gr["max"]
    assert "| gr | " in (tmp_path / "memory.md").read_text() and "update s" in (tmp_path / "memory.md").read_text()


def test_the_memory_bench_measures_a_shape_with_fewer_layers(tmp_path):
    """--layers: the shape's width and vocabulary with fewer decoder layers (where the whole model does not fit)."""
    from rlhf.experiments.memory_bench import SMALL
    args = ["--shape", "small", "--dtype", "float32", "--threads", "1", "--rows", "8", "--micro-batch", "8", "--prompt",
            "8", "--completion", "4", "--methods", "noreg"]
    params = []
    for layers in (None, 1):
        out = tmp_path / str(layers)
        done = subprocess.run([sys.executable, "-m", "rlhf.experiments.memory_bench", *args, "--out", str(out),
                               *(["--layers", str(layers)] if layers else [])],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        params.append(json.loads((out / "memory.json").read_text())["results"]["noreg"]["params"])
    per_layer = 4 * SMALL.hidden ** 2 + 3 * SMALL.hidden * SMALL.intermediate + 2 * SMALL.hidden + 3 * SMALL.hidden
    assert params[0] - params[1] == per_layer * (SMALL.layers - 1)
    assert (out / "memory.md").read_text().startswith("small with 1 layer (")
    refused = subprocess.run([sys.executable, "-m", "rlhf.experiments.memory_bench", *args, "--layers", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--layers 0: a shape needs at least one decoder layer" in refused.stderr


def test_a_method_that_does_not_fit_is_reported_and_the_others_still_measured(tmp_path, monkeypatch):
    """A measuring process the kernel kills (hvp at 0.5B on a 23 GiB machine: the OOM killer's SIGKILL) is a row that
    says so, not a lost run."""
    import os
    import signal
    from rlhf.experiments import memory_bench
    real = memory_bench.measure

    def measure(method, *args, **kwargs):
        if method == "gr-hvp":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(method, *args, **kwargs)
    monkeypatch.setattr(memory_bench, "measure", measure)
    assert memory_bench.main(["--shape", "small", "--dtype", "float32", "--threads", "1", "--rows", "8", "--prompt",
                              "16", "--completion", "8", "--methods", "noreg", "gr-hvp", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "memory.json").read_text())
    assert out["failed"] == ["gr-hvp"] and list(out["results"]) == ["noreg"]
    assert "| gr-hvp | – | – | – | – | – | killed (did not fit) | – |" in (tmp_path / "memory.md").read_text()
