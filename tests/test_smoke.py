"""`make gpu-smoke`'s command (rlhf/smoke.py) on the CPU: the same stages, processes and both update backends,
with a tiny model; the GPU run itself is only possible where a GPU is (docs/verification.md says what ran where)."""
import json
import subprocess
import sys

import pytest

from rlhf import smoke
from tests.conftest import REPO


@pytest.mark.slow
def test_smoke_runs_every_stage_in_bf16_with_both_backends(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf.smoke", "--device", "cpu", "--shape", "tiny",
                          "--methods", "gr-hvp", "--results", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-smoke" / "smoke.json").read_text())
    assert set(result["grpo"]) == {"gr-hvp-deepspeed", "gr-hvp-torch"} and not result["failed"]
    for row in result["grpo"].values():
        assert 0 < row["update"] < row["step"] and row["sharpness"] and row["onpolicy"]
    assert {"sft", "rm", "certify", "evaluate gr-hvp-deepspeed"} <= set(result["stages"])
    assert "| gr-hvp | deepspeed |" in out.stdout
    checks = result["checks"]  # the device checks (on a GPU: also NCCL with 2 GPUs and vLLM)
    assert all(c["ok"] for c in checks.values()) and len(checks) == 6, checks
    assert checks["GR correction in a bf16 update (deepspeed, hvp)"]["detail"] == "share 1.0000"
    assert "Qwen2Tokenizer" in checks["hub-shaped model (Qwen2Tokenizer, chat template) loads and samples"]["detail"]


def test_smoke_fails_loudly(tmp_path, monkeypatch, capsys):
    """A failed stage makes the command exit non-zero and name it; no CUDA device is a clear exit too."""
    monkeypatch.setattr(smoke, "run_stage", lambda config, logs, stage, *args: (stage != "rm", 0.0))
    assert smoke.main(["--device", "cpu", "--shape", "tiny", "--results", str(tmp_path)]) == 1
    assert "FAILED: rm" in capsys.readouterr().out
    import torch
    if not torch.cuda.is_available():
        assert smoke.main(["--results", str(tmp_path)]) == 1
        assert "no CUDA device" in capsys.readouterr().out
