"""Many short stage processes on one machine, each started by fork from a process that imported torch, transformers
and the stages once.

A stage process spends ~4-6 s of CPU importing torch and transformers before it computes anything; a DAG of tiny
jobs (the CI rehearsal: ~120 processes, the tests' micro DAGs) spends most of its time there. With
`RLHF_STAGE_SERVER=<socket>` in the environment, `python -m rlhf <stage> ...` hands its arguments, environment,
working folder and standard streams to the server listening there and exits as the stage does: the server forks a
copy of itself that has everything imported, which becomes the stage process (same code from `rlhf.cli.main` on, its
own environment and streams). A signal to the client reaches the stage; a client that dies (SIGKILL) takes the stage
with it. Without a server at that address, or from another namespace (a test cluster's node: the stage must run
there), or with another import-time environment, the client runs the stage itself.

Used by the tests and by `python -m rlhf.rehearsal --local --stage-server` (CI); `make rehearse`, the Slurm tests and
every user's run start each stage as a fresh process. Libraries read some variables when first imported (OMP_*,
HF_HUB_OFFLINE): start the server with the environment its stages get (`start` takes it).

    python -m rlhf.stage_server /tmp/stages.sock     # serves until killed
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ENV = "RLHF_STAGE_SERVER"
PRELOAD = ("rlhf.cli", *(f"rlhf.stages.{m}" for m in ("data", "base", "sft", "sample", "label", "rm", "advpo", "bspo",
                                                        "grpo", "dpo", "evaluate", "certify", "mechanisms", "report")))
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# Variables libraries may read when first imported (offline switches, caches, kernels, the import path). A stage whose
# values differ from the server's runs in its own process instead. Left out, as read later: thread counts (every stage
# sets its own, rlhf/stages/common.py setup; torchrun gives each rank OMP_NUM_THREADS) and NCCL's settings (read when
# a NCCL group is made; torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING for its ranks).
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "PYTORCH_", "TORCH_", "TORCHDYNAMO_",
               "TORCHINDUCTOR_", "CUDA_", "OMP_", "KMP_", "MKL_", "PYTHON", "LD_")
RUN_TIME = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NCCL_",
            "PYTORCH_NVML_BASED_CUDA_CHECK")  # read by torch.cuda.is_available(); vLLM's import sets it
NAMESPACES = ("mnt", "net", "pid", "uts", "ipc")  # a client on another node (a namespace) runs its stage there


def namespaces() -> dict:
    out = {}
    for name in NAMESPACES:
        try:
            out[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            out[name] = None
    return out


def import_env(env) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and not k.startswith(RUN_TIME)}


def _send(sock: socket.socket, payload: dict, fds: list[int] = ()) -> None:
    data = json.dumps(payload).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data)) + data], list(fds))


def _recv(sock: socket.socket, with_fds: bool = False):
    head, fds, _, _ = socket.recv_fds(sock, 4, 3) if with_fds else (sock.recv(4), [], 0, None)
    if len(head) < 4:
        return None, fds
    size, data = struct.unpack("!I", head)[0], b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


# ---- the client: `python -m rlhf` with RLHF_STAGE_SERVER set ----

def delegate(argv: list[str]) -> int | None:
    """Run `python -m rlhf argv` in a process forked by the server; its exit status (None: no server, run it here)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.environ[ENV])
    except OSError:
        return None
    before = {sig: signal.signal(sig, lambda number, _: _send(sock, {"signal": number})) for sig in FORWARDED}
    _send(sock, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "ns": namespaces()}, [0, 1, 2])
    reply, _ = _recv(sock)
    if reply is not None and "mismatch" in reply:  # the stage runs here: its signals are its own again
        for sig, handler in before.items():
            signal.signal(sig, handler)
        sock.close()
        print(f"rlhf: the stage server differs in {', '.join(reply['mismatch'])}: the stage runs in this process",
              file=sys.stderr)
        return None
    if reply is None:
        print("rlhf: the stage server closed the connection without a status", file=sys.stderr)
        return 1
    if "signal" in reply:  # end as the stage did
        signal.signal(reply["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), reply["signal"])
        time.sleep(1)
    return reply.get("code", 1)


# ---- the server ----

def _stage(request: dict, fds: list[int]) -> None:
    """In the forked stage process: become `python -m rlhf <argv>` with the client's environment and streams."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [sys.argv[0], *request["argv"]]
    from rlhf.cli import main  # imported by serve() already; not at the top, which the client imports too
    code = 1
    try:
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In a forked child of the server: fork the stage, relay signals to it, report how it ended, kill it when the
    client goes away."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        _stage(request, fds)
    for fd in fds:
        os.close(fd)
    child = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([conn, child], [], [])
        if child in ready:
            break
        message, _ = _recv(conn)
        if message is None:  # the client is gone: so is its stage
            os.kill(pid, signal.SIGKILL)
            break
        os.kill(pid, message["signal"])
    _, status = os.waitpid(pid, 0)
    reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
    try:
        _send(conn, reply)
    except OSError:
        pass
    os._exit(0)


def serve(path: str) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rlhf/__main__.py sets it for a stage process
    imported_with, own_ns = import_env(os.environ), namespaces()
    for module in PRELOAD:
        importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(path).unlink(missing_ok=True)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.replace(path + ".tmp", path)  # the address appears once it accepts
    while True:
        conn, _ = listener.accept()
        request, fds = _recv(conn, with_fds=True)
        if request is None:
            conn.close()
            continue
        theirs = import_env(request["env"])
        mismatch = sorted(k for k in {*theirs, *imported_with} if theirs.get(k) != imported_with.get(k))
        mismatch += [f"{k} namespace" for k in NAMESPACES if request.get("ns", {}).get(k) != own_ns[k]]
        if mismatch:
            _send(conn, {"mismatch": mismatch})
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _supervise(conn, request, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def start(path: Path, env: dict | None = None, timeout: float = 120) -> subprocess.Popen:
    """A server at `path` (a socket file), with `env` (what its stages get); returns once it accepts."""
    path = Path(path)
    path.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.stage_server", str(path)], env=env,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the stage server at {path} did not start (exit {proc.poll()})")
        time.sleep(0.1)
    return proc


if __name__ == "__main__":
    serve(sys.argv[1])
