"""`python -m rlhf.rehearsal`: each paper config end to end on this machine, through the Slurm profile.

For every selected config under config/paper/: the dataset folders and stand-in models it needs are built once (under
<out>/hub and <out>/models), its overlay is written (<out>/runs/<config>/overlay.yaml, rlhf/rehearsal/overlay.py), and

    snakemake --profile profiles/slurm --configfile config/paper/<config>.yaml <overlay>

runs its whole DAG on a private two-node Slurm cluster (rlhf/rehearsal/cluster.py; every job through sbatch, the
data-parallel stages on both nodes), with the hub unreachable by construction (HF_HUB_OFFLINE) and the configs' LLM
judges answered by `vllm serve` of the stand-in judge on the first node. Then the checks (rlhf/rehearsal/checks.py)
read what the run wrote and fail a config whose paths ran hollow; the paper tables are rendered from the rehearsed
results. Writes <out>/report.{md,json}: per config pass/fail, jobs, seconds and the signals; exits 1 if any failed.

`--local` runs the same DAGs with local Snakemake instead (no root needed; data-parallel stages as 2 CPU ranks under
torchrun on this node).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rlhf.config import _read_yaml, load_config, sweep_points
from rlhf.data.rlvr import rlvr_task
from rlhf.errors import ConfigError
from rlhf.io import atomic_dir, atomic_file
from rlhf.paths import Paths
from rlhf.rehearsal import checks
from rlhf.rehearsal.hub_fixtures import HUB_LAYOUTS, recipe, write_hub_dataset
from rlhf.rehearsal.overlay import NODES, changes, overlay, standins_needed, uses_judge
from rlhf.rehearsal.standins import JUDGE, build_standin
from rlhf.registry import SFT_BASELINE, dpo_methods
from rlhf.stage_server import ENV as STAGE_SERVER_ENV
from rlhf.stage_server import start as start_stage_server

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "config" / "paper"
# The subset CI runs (make test, local Snakemake), one config of each kind: TL;DR with SignCert-PO and its baselines
# (UWO's members, AdvPO, BSPO; Pythia's untied head, the Skywork gold), AlpacaFarm's script layout (the GR config with
# the fewest jobs), GSM8K with the LLM-judge reward (`vllm serve` of the stand-in judge) and MATH with math-verify.
CI_SUBSET = ("signcert-tldr-pythia-1b", "gr-math-qwen2.5-1.5b", "gr-alpaca-qwen2.5-3b", "gr-gsm8k-judge-qwen2.5-0.5b")
# CI's slice of the SignCert config runs its data-parallel stages as one process each (its batches scaled to one
# rank's), the others on 2 ranks as make rehearse runs every config. Its 11 data-parallel jobs (SFT, RM, 3 UWO members,
# BSPO's ScoreLM, 5 GRPO runs) are the subset's most numerous: on 2 ranks each paid twice the fixed costs (loading,
# DeepSpeed, evaluation waits) and the whole suite stayed over its 15-minute target. What 2 ranks check there —
# group means and SignCert's quantile over the gathered batch — tests/test_distributed.py checks against one process,
# and make rehearse ran this config on 2 Slurm nodes (docs/paper-scale.md).
CI_RANKS = {"signcert-tldr-pythia-1b": 1}
# The GRPO methods CI rehearses of a config, where not all (beyond ci_slice's first point of each sweep): every
# regularizer's path runs once in the subset — noreg, KL and Reference Resets on AlpacaFarm's RM gold, noreg and GR on
# MATH (bf16, whole: its report and paper tables), KL under the LLM judge, Dr.GRPO, SignCert-PO, UWO, AdvPO and BSPO on
# TL;DR. A regularizer's update does not read which reward made the advantages, and the reward's path (the gold RM,
# the judge, math-verify) runs in every GRPO run of its config: GR on AlpacaFarm and noreg and GR under the judge
# repeated what gr-math and the judge's KL run check, ~110 CPU-s of the suite's ~1,900 (make rehearse runs them all).
# The judge's correctness reward varies within one run (its two steps), which its check needs.
CI_METHODS = {"gr-alpaca-qwen2.5-3b": ("noreg", "kl-0.05", "resets-0.2"), "gr-gsm8k-judge-qwen2.5-0.5b": ("kl",)}
ROWS = {"tldr": {"train": 256, "validation": 64, "test": 64},
        "alpaca_farm": {"sft": 96, "preference": 96, "unlabeled": 96, "val": 96},
        "gsm8k": {"train": 256, "test": 48}, "math": {"train": 256, "test": 48}}
JUDGE_PORT = 8000


def paper_configs() -> list[Path]:
    return sorted(p for p in PAPER.glob("*.yaml") if not p.name.endswith(".base.yaml"))


def job_env(stage_server: Path | None = None, base: dict | None = None) -> dict:
    """What every rehearsal process runs with: no hub (a stage that reaches for it fails), no wandb, one thread; stage
    processes start fresh, or fork from `stage_server` (--stage-server). base: the environment it extends (default:
    this process's now; main takes it once, before a library imported here can add to it)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != STAGE_SERVER_ENV}
    if stage_server is not None:
        env[STAGE_SERVER_ENV] = str(stage_server)
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def hub_folders(out: Path) -> dict[str, str]:
    """The dataset folders, all four layouts (written once, reused while unchanged)."""
    hub = {}
    for kind in HUB_LAYOUTS:
        folder, want = out / "hub" / kind, recipe(kind, ROWS[kind])
        stamp = out / "hub" / f"{kind}.json"  # beside the folder: the folder holds only the repository's files
        if not (stamp.is_file() and json.loads(stamp.read_text()) == want and folder.is_dir()):
            with atomic_dir(folder) as tmp:
                write_hub_dataset(kind, tmp, ROWS[kind])
            stamp.write_text(json.dumps(want))
        hub[kind] = str(folder)
    return hub


def standins(out: Path, keys: set[str]) -> dict[str, str]:
    """The stand-ins `keys`, trained on the dataset folders (built once, reused while unchanged)."""
    # One torch thread: they are built while `vllm serve` starts beside them (and in CI beside the other test worker);
    # the Pythia stand-in beside one busy process took 164-199 s with torch's default 2 threads, 49 s with one (2-core
    # AVX2 machine).
    torch.set_num_threads(1)
    models = {}
    for key in sorted(keys):
        t0 = time.monotonic()
        models[key] = str(build_standin(key, out / "models", out / "hub"))
        print(f"rehearsal: stand-in {key} ready ({time.monotonic() - t0:.0f} s)", flush=True)
    return models


class JudgeServer:
    """`vllm serve` of the stand-in judge under every judge model name the configs ask for (on `host`, or loopback)."""

    def __init__(self, folder: str, names: list[str], log: Path, on: list[str] = (), host: str = "127.0.0.1",
                 port: int = JUDGE_PORT):
        self.log = open(log, "w")
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", host,
                "--port", str(port), "--served-model-name", *names, "--max-model-len", "2048",
                "--dtype", "float32", "--enforce-eager"]
        self.proc = subprocess.Popen([*on, *argv], stdout=self.log, stderr=subprocess.STDOUT, env=job_env())
        self.on, self.host, self.ready = list(on), host, False

    def wait(self, url: str, timeout: float = 600) -> None:
        """Until the server answers (at once after the first time)."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            probe = subprocess.run([*self.on, sys.executable, "-c", f"import urllib.request; urllib.request.urlopen("
                                    f"{url + '/models'!r}, timeout=2)"], capture_output=True)
            self.ready = probe.returncode == 0
            if self.ready:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start: see {self.log.name}")
            time.sleep(2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def snakemake_args(paper: Path, overlay_file: Path, workdir: Path, local: bool) -> list[str]:
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(paper), str(overlay_file)]
    if local:
        return [*args, "--cores", "2"]
    return [*args, "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4", "--retries", "0",
            "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
            "--seconds-between-status-checks", "2", "--latency-wait", "5"]


def ci_slice(cfg: dict, name: str | None = None) -> list[str] | None:
    """The methods CI rehearses of a config (`--ci`): CI_METHODS[name] where it names them; else all of them, except
    that a sweep runs its first point only; None where that is all of them. A sweep's other points run the same stages
    and code with other numbers, and on this CPU each GRPO run with its evaluation costs ~20 CPU-s, two thirds of it
    imports: the four CI configs' whole DAGs (83 jobs) took 14.5 min alone, the rest of make test 11. The report, which
    needs every run, then does not run for that config (slice_targets); make rehearse always runs whole DAGs."""
    if name in CI_METHODS:
        unknown = [m for m in CI_METHODS[name] if m not in cfg["methods"]]
        if unknown:
            raise ConfigError(f"CI_METHODS[{name!r}]: {', '.join(unknown)} not among its methods "
                              f"({', '.join(cfg['methods'])}): update rlhf/rehearsal/run.py")
        return list(CI_METHODS[name])
    dropped = {m for points in sweep_points(cfg).values() for m in list(points)[1:]}
    return [m for m in cfg["methods"] if m not in dropped] if dropped else None


def slice_targets(cfg: dict, methods: list[str]) -> list[str]:
    """The files a sliced run asks of Snakemake: every kept method's GRPO run and DPO method's policy, the evaluations
    of SFT, of the first kept method and of the DPO methods (every GRPO policy is evaluated by the same code), and
    certify in an RLHF experiment (which otherwise only the report asks for)."""
    P, seeds = Paths.from_config(cfg), cfg["seeds"]
    targets = [P.evaluation(SFT_BASELINE, cfg["seed"]), *(P.evaluation(methods[0], s) for s in seeds)]
    targets += [P.policy(m, s) for m in methods[1:] for s in seeds]
    targets += [P.evaluation(m, s) for m in dpo_methods(cfg) for s in seeds]
    return [str(t) for t in targets + ([] if rlvr_task(cfg) else [P.certify])]


def count_jobs(log: str) -> int | None:
    """The job count of the 'Job stats' table Snakemake prints as it starts (None before it got that far)."""
    if "Job stats:" not in log:
        return None
    table = log.split("Job stats:")[1].split("\n\n")[0]
    return sum(int(line.split()[-1]) for line in table.splitlines()[2:] if line.split() and line.split()[0] == "total")


def rehearse(paper: Path, out: Path, hub: dict, models: dict, judge_url: str | None, on: list[str],
             local: bool, sliced: bool = False, env: dict | None = None) -> dict:
    """One config: overlay, the run (its job count from Snakemake's log: a separate dry run would parse the Snakefile
    once more), the checks. The run's folder is made afresh. sliced: CI's share of its DAG (ci_slice)."""
    name, raw, cfg = paper.stem, _read_yaml(paper), load_config(paper)
    workdir = out / "runs" / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    layer = overlay(raw, cfg, models, hub, judge_url, local=local,
                    ranks=CI_RANKS.get(name, NODES) if sliced else NODES)
    overlay_file = workdir / "overlay.yaml"
    overlay_file.write_text(f"# rehearsal overlay of {paper.relative_to(REPO)}: sets {', '.join(changes(layer))}\n"
                            + yaml.safe_dump(layer, sort_keys=False))
    methods = ci_slice(cfg, name) if sliced else None
    argv = snakemake_args(paper, overlay_file, workdir, local) + (slice_targets(cfg, methods) if methods else [])
    result = {"config": name, "jobs": None, "seconds": None, "passed": False, "problems": [], "signals": {},
              "whole": methods is None}
    t0 = time.monotonic()
    with open(workdir / "snakemake.log", "w") as log:
        run = subprocess.run([*on, *argv], stdout=log, stderr=subprocess.STDOUT, env=env or job_env(), cwd=REPO)
    result["seconds"] = round(time.monotonic() - t0)
    text = (workdir / "snakemake.log").read_text()
    result["jobs"] = count_jobs(text)
    if run.returncode != 0:
        failed = checks.failed_jobs(workdir / "snakemake.log")
        result["problems"].append(f"snakemake exited {run.returncode}; failed: {', '.join(failed) or text[-1500:]}")
        return result
    try:
        problems, signals = checks.check_experiment(workdir / cfg["results_dir"] / cfg["experiment"], cfg, methods)
    except Exception as e:  # noqa: BLE001 - an artifact the checks cannot read is this config's failure, not the run's
        problems, signals = [f"the checks could not read the results: {type(e).__name__}: {e}"], {}
    result.update(problems=problems, signals=signals, passed=not problems)
    return result


def render_report(results: list[dict], tables: dict) -> str:
    lines = ["| config | result | jobs | seconds | signals |", "|---|---|---|---|---|"]
    for r in results:
        signals = "; ".join(f"{k} {v}" for k, v in r["signals"].items())
        verdict = "FAIL: " + " / ".join(p.splitlines()[0][:200] for p in r["problems"]) if not r["passed"] else \
            "pass" if r["whole"] else "pass (CI slice)"
        lines.append(f"| {r['config']} | {verdict} | {r['jobs']} | {r['seconds']} | {signals} |")
    if tables:
        lines += ["", "| paper table | cells the rehearsal fills | filled | empty bins | missing |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {v['cells']} | {v['filled']} | {v.get('empty', 0)} | {v['missing']}"
                  + (f" ({', '.join(v['missing_cells'])})" if v.get("missing_cells") else "") + " |"
                  for t, v in tables.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.rehearsal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="config names under config/paper/ (default: all)")
    p.add_argument("--ci", action="store_true", help=f"the CI subset: {', '.join(CI_SUBSET)}; of a config with "
                   "sweeps the first point of each, CI_METHODS' methods where it names them, and then no report "
                   "(ci_slice)")
    p.add_argument("--local", action="store_true", help="local Snakemake instead of the private Slurm cluster")
    p.add_argument("--out", default=str(REPO / "results" / "rehearsal"), help="where models, data and runs go")
    p.add_argument("--stage-server", action="store_true", help="with --local: stage processes fork from one process "
                   "that imported torch, transformers and the stages once (rlhf/stage_server.py; CI's time)")
    args = p.parse_args(argv)
    if args.stage_server and not args.local:
        p.error("--stage-server goes with --local (on the cluster each job starts its processes on its node)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the cluster and the judge (finally)
    names = list(CI_SUBSET) if args.ci else args.configs or [q.stem for q in paper_configs()]
    papers = [PAPER / f"{n}.yaml" for n in names]
    for q in papers:
        if not q.is_file():
            p.error(f"no paper config {q.name} (have: {', '.join(x.stem for x in paper_configs())})")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {q: load_config(q) for q in papers}
    judges = sorted({c["gold"]["judge"]["model"] for c in cfgs.values() if uses_judge(c)})
    # The configs that ask a judge last: `vllm serve` starts (~40 s of CPU) while the others run.
    papers.sort(key=lambda q: uses_judge(cfgs[q]))

    cluster, server, on, judge_url, stages, stage_socket = None, None, [], None, None, None
    try:
        if not args.local:
            from rlhf.rehearsal.cluster import SlurmCluster, why_unavailable  # Slurm's: not with --local
            reason = why_unavailable()
            if reason:
                print(f"rehearsal: no private Slurm cluster here ({reason}); rerun with --local", file=sys.stderr)
                return 2
            shutil.rmtree(out / "slurm", ignore_errors=True)
            cluster = SlurmCluster(out / "slurm")
            cluster.start()  # stopped in `finally`, also after a start that failed half-way
            on = cluster.login.command()
            os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
        base = dict(os.environ)  # the jobs' environment, whatever the libraries imported below add to this process's
        if args.stage_server:
            stage_socket = Path(tempfile.mkdtemp(prefix="rlhf-rehearsal-")) / "stages.sock"  # a socket path is short
            stages = start_stage_server(stage_socket, env=job_env(base=base))
        hub, models = hub_folders(out), standins(out, {JUDGE} if judges else set())
        if judges:  # on the cluster's first node (its own network), or on a free loopback port here
            from rlhf.distributed import free_port  # torch: only where a judge is served
            host, port = ("0.0.0.0", JUDGE_PORT) if cluster else ("127.0.0.1", free_port())
            server = JudgeServer(models[JUDGE], judges, out / "judge-server.log", on, host, port)
            judge_url = f"http://{cluster.names[0] if cluster else '127.0.0.1'}:{port}/v1"
        models.update(standins(out, set().union(*(standins_needed(c) for c in cfgs.values())) - {JUDGE}))
        results = []
        for q in papers:
            if uses_judge(cfgs[q]):
                server.wait(judge_url)  # returns at once once it answered
            print(f"rehearsal: {q.stem} ...", flush=True)
            results.append(rehearse(q, out, hub, models, judge_url, on, args.local, sliced=args.ci,
                                    env=job_env(stage_socket, base)))
            r = results[-1]
            print(f"rehearsal: {q.stem}: {'pass' if r['passed'] else 'FAIL'} ({r['jobs']} jobs, {r['seconds']} s) "
                  f"{r['signals']} {r['problems']}", flush=True)
    finally:
        if server is not None:
            server.close()
        if cluster is not None:
            cluster.stop()
        if stages is not None:
            stages.kill()
            stages.wait()
    tables = checks.paper_tables(out, [r["config"] for r in results if r["passed"] and r["whole"]])
    with atomic_file(out / "report.json") as f:
        json.dump({"configs": results, "tables": tables}, f, indent=1)
    with atomic_file(out / "report.md") as f:
        f.write(render_report(results, tables))
    print(render_report(results, tables))
    return 0 if all(r["passed"] for r in results) and all(v.get("missing", 0) == 0 for v in tables.values()) else 1
