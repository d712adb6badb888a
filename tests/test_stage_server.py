"""The stage server (rlhf/stage_server.py): `python -m rlhf` forked from a warm process behaves as a fresh one — same
outputs, exit status, streams and signals — and a client that dies takes its stage with it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.stage_server import ENV
from tests.conftest import REPO, write_config


def _rlhf(args, env=None, **kw):
    """`python -m rlhf args` with the environment the worker's server was started with (a test that imported vLLM
    changed this process's since), or `env`."""
    from tests.conftest import STAGE_SERVER_STARTED_WITH
    return subprocess.Popen([sys.executable, "-m", "rlhf", *args], cwd=REPO,
                            env=env or {**STAGE_SERVER_STARTED_WITH, ENV: os.environ[ENV]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def test_a_stage_forked_by_the_server_writes_what_a_fresh_process_writes(tmp_path, stage_server):
    outputs = {}
    from tests.conftest import STAGE_SERVER_STARTED_WITH
    for name, env in (("forked", {**STAGE_SERVER_STARTED_WITH, ENV: str(stage_server)}),
                      ("fresh", {k: v for k, v in os.environ.items() if k != ENV})):
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name)
        proc = _rlhf(["data", "--config", str(cfg)], env=env)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "data:" in out  # the stage's own line, through the client's stdout
        outputs[name] = [(tmp_path / name / "results" / "micro" / "data" / f).read_bytes()
                         for f in ("train.jsonl", "test.jsonl")]
    assert outputs["forked"] == outputs["fresh"]


def test_exit_status_and_error_line_come_back_to_the_client(tmp_path, stage_server):
    cfg = write_config(tmp_path)
    proc = _rlhf(["grpo", "--config", str(cfg)])  # no --method: argparse's error, status 2
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "the following arguments are required: --method, --seed" in out


def test_a_stage_started_with_another_import_time_environment_runs_in_its_own_process(tmp_path, stage_server):
    cfg = write_config(tmp_path)
    from tests.conftest import STAGE_SERVER_STARTED_WITH
    proc = _rlhf(["data", "--config", str(cfg)], env={**STAGE_SERVER_STARTED_WITH, ENV: str(stage_server),
                                                       "HF_HUB_OFFLINE": "1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "the stage server differs in HF_HUB_OFFLINE" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_client_ends_the_stage(tmp_path, stage_server, sig):
    """SIGTERM is relayed (the client then ends by it too); a SIGKILLed client cannot relay anything, and its stage is
    killed when the server sees the connection close. The stage blocks reading its config from a FIFO nobody
    writes."""
    server_pid = next(int(p.name) for p in Path("/proc").iterdir()
                      if p.name.isdigit() and _cmdline(p).endswith(str(stage_server)))
    # a stage that blocks: `python -m rlhf` reading a config from a FIFO nobody writes
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    before = _descendants(server_pid)
    proc = _rlhf(["data", "--config", str(fifo)])
    deadline = time.monotonic() + 60
    while not _descendants(server_pid) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    stage = _descendants(server_pid) - before
    assert stage, "the stage did not start in the server"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == -sig
    deadline = time.monotonic() + 30
    while _descendants(server_pid) & stage and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _descendants(server_pid) & stage, "the stage outlived its client"


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_a_stage_that_runs_in_its_client_keeps_its_own_signals(tmp_path, stage_server):
    """A client the server turned away (another import-time environment) runs the stage itself: a SIGTERM then ends
    it as it ends any process, not through the relay to a server that has hung up."""
    from tests.conftest import STAGE_SERVER_STARTED_WITH
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    proc = _rlhf(["data", "--config", str(fifo)], env={**STAGE_SERVER_STARTED_WITH, ENV: str(stage_server),
                                                        "HF_HUB_OFFLINE": "1"})
    assert "the stage server differs in HF_HUB_OFFLINE" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, out
