import json

from rlhf.cli import main


def test_bench_times_ours_and_trl(micro_run, capsys):
    """(HF vs vLLM sampling: tests/test_vllm.py; the micro model's head_dim 16 is not one vLLM's CPU kernels take.)"""
    cfg, root = micro_run
    assert main(["bench", "--config", str(cfg), "--warmup", "1", "--timed", "2", "--no-vllm"]) == 0
    result = json.loads((root / "bench" / "bench.json").read_text())
    for name in ("noreg", "gr", "gr_hvp", "signcert"):
        r = result["results"][name]
        assert 0 < r["generate"] < r["step"] and 0 < r["update"] < r["step"]
    assert result["results"]["trl_grpotrainer"]["step"] > 0
    assert set(result["ratios"]) == {"gr_update / noreg_update", "gr_hvp_update / noreg_update", "signcert_step / noreg_step",
                                     "ours_step / trl_step (same work)", "ours_noreg_step / trl_step (ours logs KL every step)"}
    assert "| ratio | value | target |" in capsys.readouterr().out
