import itertools
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# One torch thread in every process the tests start (read by torch at import): two workers share two cores, and a
# 2-thread torch process beside a busy one runs 3-4x slower than with one thread (measured, docs/verification.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


# Processes the tests start only to kill, time or isolate them (not to test process start-up) fork from one server per
# pytest worker that imported the stages once (multiprocessing's forkserver: single-threaded, unlike the xdist worker):
# started with `python -m`, each imported torch, transformers and the stage again, ~5 s of CPU here.
multiprocessing.set_forkserver_preload(["rlhf.cli", "rlhf.stages.grpo", "rlhf.stages.label", "rlhf.stages.evaluate",
                                         "tests.test_distributed"])


def _stage_main(argv: list[str], log: str, env: dict) -> None:
    os.environ.update(env)
    os.chdir(REPO)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from rlhf.cli import main
    sys.exit(main(argv))


class StageProcess:
    """`python -m rlhf <argv>` in a child forked from the preloaded forkserver, with the environment `env` on top of
    this one, stdout and stderr to a log of its own in `folder` (<stage>-<n>.log); poll / send_signal / wait /
    communicate as subprocess.Popen's."""
    _started = itertools.count()

    def __init__(self, argv: list[str], folder: Path, env: dict | None = None):
        self.argv, self.log = list(argv), Path(folder) / f"{argv[0]}-{next(self._started)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = multiprocessing.get_context("forkserver").Process(
            target=_stage_main, args=(self.argv, str(self.log), dict(env or {})))
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(["rlhf", *self.argv], timeout)
        return self.proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        return (self.log.read_text() if self.log.is_file() else ""), None


def write_config(tmp_path: Path, base: str = "micro.yaml", **sections) -> Path:
    """A copy of config/<base> with results under tmp_path and the given top-level keys replaced."""
    cfg = yaml.safe_load((REPO / "config" / base).read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# `make test` runs two pytest-xdist workers, one test file per work unit (--dist loadfile --no-loadscope-reorder): the
# files that take longest start first, the short ones fill in after, and both workers finish together.
LONGEST_FIRST = ("test_rehearsal.py", "test_slurm.py", "test_workflow.py", "test_baselines.py", "test_robustness.py",
                 "test_tables.py", "test_distributed.py", "test_rlvr_miniature.py", "test_smoke.py", "test_vllm.py",
                 "test_judge.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


STAGE_SERVER_STARTED_WITH: dict = {}  # the environment the worker's stage server imported with


@pytest.fixture(scope="session", autouse=True)
def stage_server():
    """The stage processes tests start (`python -m rlhf`: Snakemake jobs, torchrun's ranks, subprocesses) fork from one
    server per pytest worker that imported torch, transformers and the stages once (rlhf/stage_server.py): ~4-6 s of
    CPU less per process, the same code from rlhf.cli.main on. Tests of what a fresh process does on a cluster node
    (tests/test_slurm.py) go without it."""
    import tempfile

    from rlhf.stage_server import ENV, start
    folder = Path(tempfile.mkdtemp(prefix="rlhf-stages-"))  # a short path: a socket's is limited to 107 bytes
    STAGE_SERVER_STARTED_WITH.update(os.environ)
    proc = start(folder / "server.sock", env=dict(os.environ))
    os.environ[ENV] = str(folder / "server.sock")
    yield folder / "server.sock"
    os.environ.pop(ENV, None)
    proc.kill()
    proc.wait()


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def one_process_per_test():
    """A stage run in-process with DeepSpeed sets what a launcher would (RANK, WORLD_SIZE, ...) and keeps a process
    group, as a real job does until it exits. Tests share one process: undo both after each test, or later
    stages (and the Snakemake jobs they start) would believe they run under torchrun."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    from rlhf.distributed import destroy_process_group
    destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def record_applied_gradient(update) -> dict:
    """Make `update.step` first keep the gradient it applies (full, float64 copies) in the returned dict's
    "grad": what the optimizer got, whatever backend holds it."""
    params = [p for p in update.model.parameters() if p.requires_grad]
    seen, step = {}, update.step

    def recording_step():
        seen["grad"] = [g.detach().double().clone() for g in update.read(params)]
        return step()

    update.step = recording_step
    return seen


def micro_grpo(**overrides):
    """The micro config's GRPO settings (every field; schema defaults) with some replaced."""
    from rlhf.config import load_config
    from rlhf.settings import GRPOSettings
    return GRPOSettings(**{**load_config(REPO / "config" / "micro.yaml")["grpo"], **overrides})


@pytest.fixture
def micro_config(tmp_path):
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The micro config run stage by stage through the CLI once; tests read its artifacts."""
    cfg = write_config(tmp_path_factory.mktemp("micro"))
    return cfg, run_micro(cfg)


def run_micro(cfg: Path) -> Path:
    """Every stage of the micro config through the CLI; the experiment's results folder."""
    from rlhf.cli import main
    for stage in ["data", "base", "sft", "sample", "label", "rm"]:
        assert main([stage, "--config", str(cfg)]) == 0, stage
    for method in ["noreg", "kl", "resets", "gr", "signcert"]:
        assert main(["grpo", "--config", str(cfg), "--method", method, "--seed", "0"]) == 0
        assert main(["evaluate", "--config", str(cfg), "--method", method, "--seed", "0"]) == 0
    assert main(["evaluate", "--config", str(cfg), "--method", "sft", "--seed", "0"]) == 0
    assert main(["certify", "--config", str(cfg)]) == 0
    assert main(["report", "--config", str(cfg)]) == 0
    return cfg.parent / "results" / "micro"


TINY = dict(arch="qwen2", hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position_embeddings=64)
# The miniature's shape (config/miniature.yaml): head_dim 32 is one vLLM's CPU attention supports.
MINIATURE = dict(arch="qwen2", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                 max_position_embeddings=64)


def build_tiny(extra_words=(), seed: int = 0, **shape):
    """(a random LM of shape TINY with `shape`'s changes, its word-level tokenizer: the miniature's vocabulary plus
    extra_words). The one place tests build models from scratch."""
    from rlhf.data.miniature import MiniatureSpec
    from rlhf.models import build_tiny_causal_lm, build_word_tokenizer
    tok = build_word_tokenizer(MiniatureSpec().vocabulary() + list(extra_words))
    return build_tiny_causal_lm({**TINY, **shape}, tok, seed=seed), tok


@pytest.fixture(scope="session")
def tiny_lm():
    """A random tiny Qwen2 LM and its word-level tokenizer (no training)."""
    return build_tiny()


@pytest.fixture
def float64_lm(tiny_lm, monkeypatch):
    """A float64 tiny GPT-NeoX LM (same tokenizer): exact to ~1e-15, for gradients checked against math.

    Exactness needs float64 all the way: GPT-NeoX normalizes with nn.LayerNorm (Qwen2's RMSNorm computes in
    float32), eager attention, and its softmax, which transformers pins to float32, is kept in float64 here.
    """
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **kw: softmax(
        x, dim=dim, dtype=torch.promote_types(x.dtype, dtype) if dtype is not None else None, **kw))
    model, tok = build_tiny(arch="gpt_neox")
    model = model.double()
    model.set_attn_implementation("eager")
    return model, tok


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def snakemake(cfg: Path, *args: str, cores: str = "2", env=None, on=()) -> subprocess.CompletedProcess:
    """Snakemake on a config, run in the config's folder (results land beside it); `on`: a command prefix that runs
    it elsewhere (a test cluster's node)."""
    cmd = [*on, *SNAKEMAKE, "--directory", str(cfg.parent), "--configfile", str(cfg), *args]
    if cores:  # and one torch thread per job (sft, sample and rm ask for 2 by default): see OMP_NUM_THREADS above
        cmd += ["--cores", cores, "--max-threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="session")
def micro_snakemake(tmp_path_factory):
    """The micro DAG run once by local Snakemake: (config, dry run, run), every stage process recording the files it
    was given and touched under <config folder>/trace (rlhf.cli.trace_file_access). Tests never assert elapsed time."""
    from rlhf.cli import TRACE_ENV
    cfg = write_config(tmp_path_factory.mktemp("micro_snakemake"))
    (cfg.parent / "trace").mkdir()
    return cfg, snakemake(cfg, "-n"), snakemake(cfg, env={**os.environ, TRACE_ENV: str(cfg.parent / "trace")})
