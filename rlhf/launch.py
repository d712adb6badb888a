"""Start a data-parallel stage on several nodes of a Slurm job: one torchrun per node, the c10d rendezvous.

A rule whose job asks `resources.jobs.<stage>.nodes > 1` runs (rlhf/cluster.py writes the command)

    python -m rlhf.launch --nodes N --gpus-per-node G --cpus-per-node C -- -m rlhf <stage> ...

on the job's first node. That call checks it is inside an N-node Slurm job and hands over to
`srun --ntasks-per-node 1 --kill-on-bad-exit=1 python -m rlhf.launch --on-node ...`, which runs once per node: it
checks what a rendezvous across nodes needs of this node (its own name and the rendezvous host resolve; a
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME names an interface this node has; gloo would not listen on loopback) and
fails in one line naming the node and the remedy, else becomes

    torchrun --nnodes N --nproc-per-node max(G, 1) --rdzv-backend c10d --rdzv-id $SLURM_JOB_ID
             --rdzv-endpoint <first node>:<port> --max-restarts 0 -m rlhf <stage> ...

Any rank's failure ends its torchrun with an error, srun then kills the other nodes' (--kill-on-bad-exit), the job
fails and the profile's retries resubmit it; GRPO resumes from its last checkpoint (rlhf/trainer.py). The port is
29400 + job id mod 1000 (RLHF_RDZV_PORT overrides), so two jobs that share a first node do not collide.

Hand-written because torchrun's rendezvous needs a host and an id that only Slurm knows, and its own failure for a
name that does not resolve is a traceback from deep inside the rendezvous (socket.gaierror).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Callable, Mapping, Sequence

BASE_PORT = 29400


class LaunchError(Exception):
    """One line naming the node and the remedy."""


def _addresses(name: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})


def _names_interface(value: str, interfaces: Sequence[str], nccl: bool) -> bool:
    """Whether a *_SOCKET_IFNAME value selects an interface of this node. Gloo: a comma list of exact names, each
    must exist. NCCL: a comma list of prefixes ('=' before the list: exact names; '^': exclusions, always met)."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not nccl:
        return bool(items) and all(x in interfaces for x in items)
    if value.startswith("^"):
        return True
    if value.startswith("="):
        return any(x.lstrip("=") in interfaces for x in items)
    return any(i.startswith(x) for x in items for i in interfaces)


def node_problem(node: str, hostname: str, rdzv_host: str, env: Mapping[str, str], interfaces: Sequence[str],
                 resolve: Callable[[str], list[str]], gloo: bool) -> str | None:
    """The first thing that would break a multi-node rendezvous on this node, as one line; None if nothing does."""
    have = ", ".join(sorted(interfaces))
    try:
        own = resolve(hostname)
    except OSError:
        return (f"node {node}: its hostname {hostname!r} does not resolve (torch's c10d rendezvous looks itself up by "
                f"name): add it to /etc/hosts or DNS on every node")
    try:
        resolve(rdzv_host)
    except OSError:
        return (f"node {node}: the rendezvous host {rdzv_host!r} (the job's first node) does not resolve here: add it "
                f"to /etc/hosts or DNS on every node")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = env.get(var)
        if value and not _names_interface(value, interfaces, nccl=var.startswith("NCCL")):
            return (f"node {node}: {var}={value} names no interface here (this node has: {have}): set it to the "
                    f"interface of the network the nodes share, on every node")
    if gloo and not env.get("GLOO_SOCKET_IFNAME") and own and all(a.startswith("127.") for a in own):
        return (f"node {node}: its hostname {hostname!r} resolves to {', '.join(own)} (loopback), where gloo would "
                f"listen and the other nodes cannot connect: set GLOO_SOCKET_IFNAME to the interface of the network "
                f"the nodes share (this node has: {have})")
    return None


def _allocation(job: str) -> tuple[int, str]:
    """(nodes, first node's hostname) of a Slurm job, asked of scontrol: Snakemake's jobstep executor removes the
    job's SLURM_* variables other than its id before it runs a command."""
    def scontrol(*args: str) -> str:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise LaunchError(f"scontrol {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout
    fields = dict(f.split("=", 1) for f in scontrol("-o", "show", "job", job).split() if "=" in f)
    hosts = scontrol("show", "hostnames", fields.get("NodeList", "")).split()
    if not hosts:
        raise LaunchError(f"the Slurm job {job} has no nodes yet (scontrol show job {job}: NodeList="
                          f"{fields.get('NodeList')!r})")
    return int(fields.get("NumNodes", len(hosts)).split("-")[0]), hosts[0]


def job_side(args, command: list[str]) -> list[str]:
    """On the job's first node: the srun command that starts this module once per node."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        raise LaunchError(f"this stage asks {args.nodes} nodes (resources.jobs.<stage>.nodes) and runs outside a "
                          "Slurm job: run it through a Slurm profile (snakemake --profile profiles/slurm) or set "
                          "nodes: 1")
    job = env["SLURM_JOB_ID"]
    have, first = _allocation(job)
    if have != args.nodes:
        raise LaunchError(f"the Slurm job {job} has {have} node(s), the config asks {args.nodes} "
                          f"(resources.jobs.<stage>.nodes): submit it with --nodes {args.nodes} (the Slurm profile "
                          "does)")
    port = int(env.get("RLHF_RDZV_PORT", BASE_PORT + int(job) % 1000))
    return ["srun", f"--nodes={args.nodes}", f"--ntasks={args.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={args.cpus_per_node}", "--kill-on-bad-exit=1",
            sys.executable, "-m", "rlhf.launch", "--on-node", "--nodes", str(args.nodes),
            "--gpus-per-node", str(args.gpus_per_node), "--rdzv-endpoint", f"{first}:{port}", "--", *command]


def node_side(args, command: list[str]) -> list[str]:
    """On each node: the checks, then the torchrun command."""
    hostname = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME", hostname)
    problem = node_problem(node, hostname, args.rdzv_endpoint.rsplit(":", 1)[0], os.environ,
                           [name for _, name in socket.if_nameindex()], _addresses, gloo=args.gpus_per_node == 0)
    if problem:
        raise LaunchError(problem)
    nproc = max(args.gpus_per_node, 1)
    print(f"rlhf.launch: node {node}: {nproc} rank(s), c10d rendezvous at {args.rdzv_endpoint}", flush=True)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nodes),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-id", os.environ.get("SLURM_JOB_ID", "rlhf"), "--rdzv-endpoint", args.rdzv_endpoint,
            "--max-restarts", "0", *command]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m rlhf.launch", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --nodes N [--gpus-per-node G] [--cpus-per-node C] -- -m rlhf "
                                           "<stage> ...")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the Slurm job (>= 2)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU; 0: one rank per node (gloo)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each node's task (srun --cpus-per-task)")
    parser.add_argument("--on-node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rdzv-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(ours)
    if not command:
        parser.error("nothing to launch: give the stage after --, e.g. -- -m rlhf grpo ...")
    try:
        cmd = node_side(args, command) if args.on_node else job_side(args, command)
    except LaunchError as e:
        print(f"rlhf.launch: {e}", file=sys.stderr, flush=True)
        return 2
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
