"""`python -m rlhf <stage> --config FILE [key.sub=value ...]`: one command per pipeline stage.

By hand, a stage reads the experiment's config and finds its files in the experiment's layout. Under Snakemake it is
given exactly its view of the config (`--settings`, the rule's rerun trigger), its side settings (environment variable
RLHF_SIDE_SETTINGS) and the files its rule declares (`--input NAME PATH...`, `--output NAME PATH`): rlhf/registry.py.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
from pathlib import Path

from rlhf.errors import ConfigError, RLHFError
from rlhf.registry import (SFT_BASELINE, STAGES, canonical, dpo_methods, ensemble_members, merge_views,
                           stage_config, stage_files)
from rlhf.config import complete_view, load_config

SIDE_ENV = "RLHF_SIDE_SETTINGS"


class StageFiles(dict):
    """name -> Path (or list of Paths); a name the rule did not declare is an error naming the flag to pass."""

    def __init__(self, stage: str, kind: str, items: dict):
        super().__init__({k: [Path(p) for p in v] if isinstance(v, list) else Path(v) for k, v in items.items()})
        self.stage, self.kind = stage, kind

    def __missing__(self, name):
        raise ConfigError(f"stage {self.stage} was not given its {self.kind} '{name}' (--{self.kind} {name} PATH)")


class RunFiles:
    def __init__(self, stage: str, inputs: dict, outputs: dict, work: dict):
        self.inputs = StageFiles(stage, "input", inputs)
        self.outputs = StageFiles(stage, "output", outputs)
        self.work = StageFiles(stage, "work", work)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, st in STAGES.items():
        s = sub.add_parser(name, help=st.help, description=st.help)
        how = s.add_mutually_exclusive_group(required=True)
        how.add_argument("--config", help="experiment YAML (validated against workflow/schemas/config.schema.yaml)")
        if not st.tool:
            how.add_argument("--settings", help="the stage's config view as JSON (what the Snakefile passes)")
            for kind in ("input", "output", "work"):
                s.add_argument(f"--{kind}", nargs="+", action="append", default=[], metavar=("NAME", "PATH"),
                               help=f"a declared {kind} (default: the experiment's layout)")
        s.add_argument("--threads", type=int, help="torch CPU threads (default: resources.threads)")
        if st.per_run:
            s.add_argument("--method", required=True,
                           help="a key of config.methods" + (f" or '{SFT_BASELINE}'" if name == "evaluate" else ""))
            s.add_argument("--seed", type=int, required=True, help="policy-optimization seed")
        if st.per_member:
            s.add_argument("--member", type=int, required=True, help="ensemble member k (1..ensemble.members)")
        if name == "bench":
            s.add_argument("--warmup", type=int, default=3, help="untimed steps first")
            s.add_argument("--timed", type=int, default=20, help="timed steps (mean reported)")
            s.add_argument("--repeats", type=int, default=3, help="independent repeats of every timing (each in its own "
                           "method order); ratios are reported as median and min-max over them")
            s.add_argument("--no-vllm", action="store_true", help="skip the HF vs vLLM sampling comparison")
            s.add_argument("--methods", nargs="+", metavar="NAME", help="time only these rows (rlhf/stages/bench.py "
                           "METHODS; trl: ours against TRL's GRPOTrainer), so that one ratio gets many rounds; "
                           "default: all")
        if name == "plan":
            s.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (GiB; H100: 80)")
        if name == "judge-cost":
            s.add_argument("--prompt-tokens", type=float, help="mean tokens of a prompt, when the data stage has not run")
            s.add_argument("--train-prompts", type=int, help="train prompts available, when the data stage has not run")
        s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. grpo.lr=1e-4")
    return p


def add_side_settings(current: str | None, root, side: dict) -> str:
    """$RLHF_SIDE_SETTINGS with `side` as the entry of the experiment whose results folder is `root` (kept absolute:
    the Snakefile and the stage resolve it from the same working directory)."""
    table = json.loads(current) if current else {}
    if not all(isinstance(v, dict) and os.path.isabs(k) for k, v in table.items()):
        table = {}  # an older or foreign value: start afresh
    table[os.path.abspath(root)] = side
    return canonical(table)


def side_settings_for(value: str, outputs: list[str]) -> dict:
    """The side settings of the experiment the stage writes into: the entry whose folder holds its outputs."""
    table = json.loads(value)
    for out in outputs:
        target = os.path.abspath(out)
        for root, side in table.items():
            if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
                return side
    held = outputs[0] if outputs else "no output"
    raise ConfigError(f"${SIDE_ENV} has no experiment whose results folder holds {held} (it has "
                      f"{', '.join(table) or 'none'}): run the stage through the Snakefile, or with --config FILE")


def _given(pairs: list[list[str]], stage: str, kind: str) -> dict:
    out = {}
    for name, *paths in pairs:
        many = kind == "input" and STAGES[stage].is_list(name)
        if not many and len(paths) != 1:  # a list input may be empty (e.g. a GRPO run's ensemble without UWO)
            raise ConfigError(f"--{kind} {name}: give the name and " + ("its paths" if many else "one path"))
        out[name] = paths if many else paths[0]
    return out


def resolve(args) -> tuple[dict, RunFiles | None]:
    """The stage's config view and files, from --config (the experiment's layout) or from what Snakemake passed."""
    st, seed = STAGES[args.stage], getattr(args, "seed", None)
    key = args.member if st.per_member else getattr(args, "method", None)  # what the files are keyed by: k or method
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        if st.tool:
            return cfg, None
        known = [*cfg["methods"], *dpo_methods(cfg)]
        if st.per_run and key != SFT_BASELINE and key not in known:
            raise ConfigError(f"method '{key}' is not in config.methods or dpo.methods (have: {', '.join(known)})")
        if st.per_member and key not in ensemble_members(cfg):
            raise ConfigError(f"--member {key}: the config's ensemble has members {ensemble_members(cfg) or 'none'}")
        view = stage_config(cfg, args.stage, key)
        files = stage_files(args.stage, cfg, key, seed)
    else:
        if args.overrides:
            raise ConfigError("overrides go with --config; --settings is the complete view")
        if SIDE_ENV not in os.environ:
            raise ConfigError(f"--settings needs the side settings in ${SIDE_ENV} (the Snakefile sets it); "
                              "by hand, run the stage with --config FILE")
        side = side_settings_for(os.environ[SIDE_ENV], [paths[-1] for _, *paths in args.output if paths])
        view = merge_views(complete_view(json.loads(args.settings), args.stage), side)
        files = {"inputs": {}, "outputs": {}, "work": {}}
    for kind in ("input", "output", "work"):
        files[kind + "s" if kind != "work" else kind].update(_given(getattr(args, kind), args.stage, kind))
    return view, RunFiles(args.stage, files["inputs"], files["outputs"], files["work"])


TRACE_ENV = "RLHF_TRACE_FILES"  # a folder: each stage process writes there the files it was given and the ones it touched
_TOUCH = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile",
          "os.listdir", "os.scandir", "sqlite3.connect"}


def trace_file_access(folder: str, stage: str, files: RunFiles | None) -> None:
    """Record every path the process opens, lists, writes, renames or deletes (Python's audit events), for the test
    that compares them with what the rule declares. os.write on a raw descriptor raises no audit event."""
    fd = os.open(os.path.join(folder, f"{stage}-{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    given = {kind: {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in getattr(files, kind).items()}
             for kind in ("inputs", "outputs", "work")} if files is not None else {}
    os.write(fd, (json.dumps({"stage": stage, "given": given}) + "\n").encode())

    def hook(event, args):
        if event in _TOUCH:
            paths = [a for a in args[:2 if event in ("os.rename", "shutil.copyfile") else 1] if isinstance(a, (str, Path))]
            mode = args[1] if event == "open" and len(args) > 1 and isinstance(args[1], str) else ""
            for path in paths:
                os.write(fd, (json.dumps({"event": event, "path": os.path.abspath(path), "mode": mode}) + "\n").encode())
    sys.addaudithook(hook)


def group_threads() -> list[str]:
    """Names of this process's threads that belong to a process group (gloo's transport loop and work threads,
    NCCL's watchdog; Linux's /proc, empty elsewhere)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(comm.read_text().strip())
    return [n for n in names if n.startswith(("gloo", "pt_gloo", "pt_nccl"))]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg, files = resolve(args)
        if os.environ.get(TRACE_ENV):
            trace_file_access(os.environ[TRACE_ENV], args.stage, files)
        module = importlib.import_module(f"rlhf.stages.{STAGES[args.stage].module or args.stage.replace('-', '_')}")
        before = group_threads()  # none in a stage's own process; a test may run stages in one that has some
        module.run(cfg, args) if files is None else module.run(cfg, files, args)
        # What the stage left in reference cycles may still hold its destroyed process group (DeepSpeed keeps it on
        # every parameter): freed now, the group's threads are joined while the interpreter is whole, not during its
        # shutdown (rlhf.distributed.WORLD_GROUP_DEFAULTS).
        gc.collect()
        if len(leaked := group_threads()) > len(before):
            print(f"warning: a process group outlived the {args.stage} stage (threads {', '.join(leaked)}): something "
                  "still references it, and its threads may abort this process at exit", file=sys.stderr)
    except RLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
