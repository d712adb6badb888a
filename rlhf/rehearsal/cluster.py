"""A private Slurm 22.05 cluster of one or more "nodes" on this machine, for the tests and the paper rehearsal.

Each node is a holder process in its own network, UTS and mount namespaces (`unshare`): its own hostname, its own
/etc/hosts and /etc/slurm (bind mounts of the cluster folder's `hosts` and `etc/`, private to the node's mount
namespace), its own loopback and one end of a veth pair (two nodes) — to torch, gloo and Slurm a separate host. Commands run on a node through
`nsenter` into the holder's namespaces. The cluster has its own munged (own key and socket), its own config
(`SLURM_CONF`, AuthInfo=socket=...), slurmctld and one slurmd per node; state, spool and logs live in one folder.
Nothing is written outside that folder: not /etc/slurm, /etc/netns or /run/netns, nor the system's munge.

Teardown kills exactly what the cluster started: every process living in one of its nodes' network namespaces
(daemons, job steps, ranks) and its own munged; the namespaces and the veth pair vanish with their last process.

Needs root (namespaces, daemons as root) and Debian's slurm-wlm and munge (installed with apt-get where missing).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "unshare", "nsenter", "ip")
SUBNET = "10.200.0"   # only ever configured inside the cluster's own network namespaces
# Inside the nodes the cluster's config folder is mounted over this one: a job step started by Snakemake's jobstep
# executor runs without SLURM_CONF (the plugin drops every SLURM_* variable but the job's identity), so srun there
# reads /etc/slurm/slurm.conf. The mount lives in the node's private mount namespace: the system's folder is untouched.
SYSTEM_ETC = Path("/etc/slurm")


def why_unavailable() -> str | None:
    """None when a private cluster can be started here, else the reason (the test is skipped with it)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and start munged, slurmctld and slurmd"
    if not all(shutil.which(b) for b in TOOLS):
        if not shutil.which("apt-get"):
            return "slurm-wlm and munge are not installed and there is no apt-get"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", *PACKAGES, "util-linux", "iproute2"]
        out = subprocess.run(install, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            out = subprocess.run(install, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {out.stderr.strip()[-300:]}"
    if not SYSTEM_ETC.is_dir():
        return f"{SYSTEM_ETC} does not exist (slurm-client creates it): nothing to mount the cluster's config over"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here (unshare: {probe.stderr.strip()[-200:]})"
    return None


def _real_memory() -> int:
    """This machine's memory in MB as slurmd reports it (every node claims it all: jobs ask --mem)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.split()
    return int(next(f.split("=")[1] for f in line if f.startswith("RealMemory=")))


class Node:
    """One "host": a `sleep` holding new network, UTS and mount namespaces with the node's hostname and hosts file."""

    def __init__(self, name: str, addr: str, hosts: Path, etc_slurm: Path):
        self.name, self.addr = name, addr
        setup = (f"mount --bind {hosts} /etc/hosts && mount --bind {etc_slurm} {SYSTEM_ETC} && hostname {name} && "
                 "ip link set lo up && echo up && exec sleep infinity")
        self.holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private",
                                        "sh", "-c", setup], stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "up":
            raise RuntimeError(f"node {name}: its namespaces could not be set up (unshare exited "
                               f"{self.holder.wait()})")
        self.netns = os.readlink(f"/proc/{self.holder.pid}/ns/net")

    def command(self, *argv: str) -> list[str]:
        """argv run on this node (its network, hostname and /etc/hosts; same files and processes otherwise)."""
        return ["nsenter", "-t", str(self.holder.pid), "--net", "--uts", "--mount", "--", *argv]

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), check=True, capture_output=True, text=True, **kw)

    def processes(self) -> list[int]:
        """Every process in this node's network namespace (the holder included)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "net") == self.netns:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids


class SlurmCluster:
    """`with SlurmCluster(folder, ["nodea", "nodeb"]) as c:` — c.env for clients, c.node(name).command(...) to run
    there (Snakemake runs on the first node, the controller's: the login node of this cluster)."""

    def __init__(self, root: Path, names=("nodea", "nodeb"), cpus: int = 2):
        self.root = Path(root)
        self.names, self.cpus = list(names), cpus
        self.nodes: dict[str, Node] = {}
        self.munged: subprocess.Popen | None = None
        self.daemons: list[subprocess.Popen] = []
        self.etc = self.root / "etc"
        self.conf = self.etc / "slurm.conf"
        self.socket = self.root / "munge" / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def node(self, name: str) -> Node:
        return self.nodes[name]

    @property
    def login(self) -> Node:
        return self.nodes[self.names[0]]

    def _start_nodes(self) -> None:
        addrs = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        hosts = self.root / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addrs.items()))
        self.etc.mkdir(exist_ok=True)
        for name in self.names:
            self.nodes[name] = Node(name, addrs[name], hosts, self.etc)
        if len(self.names) == 2:  # one veth pair, one end in each node
            a, b = (self.nodes[n] for n in self.names)
            tag = f"rl{os.getpid() % 100000}"
            subprocess.run(["ip", "link", "add", f"{tag}a", "netns", str(a.holder.pid), "type", "veth",
                            "peer", "name", f"{tag}b", "netns", str(b.holder.pid)], check=True, capture_output=True)
            for node, dev in ((a, f"{tag}a"), (b, f"{tag}b")):
                node.run("ip", "link", "set", dev, "name", "eth0")
                node.run("ip", "addr", "add", f"{node.addr}/24", "dev", "eth0")
                node.run("ip", "link", "set", "eth0", "up")
        elif len(self.names) == 1:
            node = self.login
            node.run("ip", "addr", "add", f"{node.addr}/32", "dev", "lo")
        else:
            raise ValueError("one or two nodes")

    def _start_munge(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o700)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        with open(folder / "munged.out", "w") as log:
            self.munged = subprocess.Popen(
                ["munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
                 f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/seed"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.munged.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: see {folder}/munged.out")
            time.sleep(0.1)

    def write_config(self) -> None:
        for d in ("state", *(f"spool/{n}" for n in self.names)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        memory = _real_memory()
        nodes = "".join(f"NodeName={n} NodeAddr={self.nodes[n].addr} CPUs={self.cpus} RealMemory={memory} "
                        "State=UNKNOWN\n" for n in self.names)
        # SlurmdTimeout / MessageTimeout: the nodes share the host's cores (and memory) with the rest of a test suite,
        # and a starved slurmd is not a failed node. At the defaults (300 s / 10 s) a loaded host got both nodes marked
        # DOWN mid-job; Slurm requeued the running rm job, whose `srun` then failed ("Unable to confirm allocation for
        # job 2: Job is pending execution") and the profile's retry ran it again: the two-node test's extra submission.
        self.conf.write_text(f"""\
ClusterName=rlhfci
SlurmctldHost={self.names[0]}({self.login.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmdTimeout=3600
MessageTimeout=60
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, node: Node, name: str, *argv: str) -> None:
        with open(self.root / f"{name}.out", "w") as log:
            self.daemons.append(subprocess.Popen(node.command(*argv), env=self.env, stdout=log,
                                                 stderr=subprocess.STDOUT))

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_nodes()
            self._start_munge()
            self.write_config()
            self._daemon(self.login, "slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
            for name, node in self.nodes.items():
                self._daemon(node, f"slurmd-{name}", "slurmd", "-D", "-N", name, "-f", str(self.conf))
            deadline = time.monotonic() + timeout
            states = ""
            while time.monotonic() < deadline:
                out = subprocess.run(self.login.command("sinfo", "-h", "-N", "-o", "%N %T"), capture_output=True,
                                     text=True, env=self.env)
                states = out.stdout.strip() or out.stderr.strip()
                lines = out.stdout.strip().splitlines()
                if out.returncode == 0 and len(lines) == len(self.names) and all(" idle" in x for x in lines):
                    return
                time.sleep(0.5)
            raise RuntimeError(f"the private Slurm did not come up: sinfo says {states!r}; see "
                               f"{self.root}/slurmctld.log and slurmd-*.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every process in the nodes' namespaces (daemons, job steps, ranks, holders), then munged."""
        for node in self.nodes.values():
            for pid in node.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            node.holder.wait(timeout=20)
        for proc in self.daemons:  # killed above (they lived in a node): reap them
            proc.wait(timeout=20)
        self.daemons.clear()
        self.nodes.clear()
        if self.munged is not None:
            self.munged.terminate()
            self.munged.wait(timeout=20)
            self.munged = None

    def submitted_jobs(self) -> int:
        """Batch jobs slurmctld accepted (from its log: one line per sbatch)."""
        return (self.root / "slurmctld.log").read_text().count("_slurm_rpc_submit_batch_job: JobId=")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
