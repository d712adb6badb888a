"""The Snakemake DAG on the micro config: whole run, what a change reruns, and what each stage reads and writes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.registry import STAGES
from tests.conftest import REPO, SNAKEMAKE, jobs, snakemake, write_config


@pytest.mark.slow
def test_whole_dag_on_micro_config(micro_snakemake):
    cfg, dry, run = micro_snakemake
    assert dry.returncode == 0, dry.stderr
    assert jobs(dry.stdout) == {"data": 1, "base": 1, "sft": 1, "sample": 1, "label": 1, "rm": 1,
                                "grpo": 5, "evaluate": 6, "certify": 1, "report": 1, "all": 1}
    assert run.returncode == 0, run.stderr[-3000:]
    report = cfg.parent / "results" / "micro" / "report"
    assert (report / "table.csv").is_file() and (report / "rewards_vs_step.png").is_file()


def _scheduled(cfg, *args, cwd=None, configfile=None) -> dict:
    """{rule: jobs} a dry run schedules ({} when nothing is to be done)."""
    out = subprocess.run([*SNAKEMAKE, "--directory", str(cfg.parent), "--configfile", configfile or str(cfg), "-n",
                          "--cores", "1", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return {} if "Nothing to be done" in out.stdout + out.stderr else jobs(out.stdout)


DOWNSTREAM_OF_RM = {"rm": 1, "grpo": 5, "evaluate": 6, "certify": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_a_change_reruns_exactly_what_depends_on_it(micro_snakemake):
    """Rerun triggers are a rule's inputs, its own view of the config and its (config-independent) command: never the
    config file's spelling, another stage's section, or side settings (logging, the judge client's pacing)."""
    cfg, _, run = micro_snakemake
    assert run.returncode == 0, run.stderr[-3000:]
    assert _scheduled(cfg) == {}
    assert _scheduled(cfg, cwd=cfg.parent, configfile="config.yaml") == {}  # relative spelling of the same file
    assert _scheduled(cfg, cwd=cfg.parent.parent, configfile=f"{cfg.parent.name}/config.yaml") == {}
    assert _scheduled(cfg, "--config", "wandb={project: elsewhere}") == {}
    assert _scheduled(cfg, "--config", "gold={judge: {concurrency: 3, timeout: 5}}") == {}
    assert _scheduled(cfg, "--config", "grpo={lr: 5.0e-3}") == {"grpo": 5, "evaluate": 5, "report": 1, "all": 1}
    assert _scheduled(cfg, "--config", "methods={kl: {kl_beta: 0.2}}") == {"grpo": 1, "evaluate": 1, "report": 1,
                                                                           "all": 1}
    assert _scheduled(cfg, "--config", "evaluate={temperature: 0.7}") == {"evaluate": 6, "report": 1, "all": 1}
    assert _scheduled(cfg, "--config", "certify={noise_samples: 3}") == {"certify": 1, "report": 1, "all": 1}
    assert _scheduled(cfg, "--config", "rm={lr: 2.0e-3}") == DOWNSTREAM_OF_RM
    assert _scheduled(cfg, "--forcerun", "rm") == DOWNSTREAM_OF_RM
    assert _scheduled(cfg, "--config", "sft={lr: 1.0e-3}") == {"sft": 1, "sample": 1, "label": 1, **DOWNSTREAM_OF_RM}
    assert _scheduled(cfg, "--config", "seeds=[0, 1]") == {"grpo": 5, "evaluate": 5, "report": 1, "all": 1}
    # a field written out at its schema default is no change (what a release adding a setting looks like) ...
    assert _scheduled(cfg, "--config", "grpo={elastic_reset_decay: 0.995, gr_estimator: finite_difference}") == {}
    # ... and a method moved back onto the default of a field the section sets is one
    assert _scheduled(cfg, "--config", "methods={kl: {kl_beta: 0.0}}")["grpo"] == 1


@pytest.mark.parametrize("name", ["micro.yaml", "rlvr-micro.yaml", "paper/gr-gsm8k-judge-qwen2.5-0.5b.yaml"])
def test_a_stage_gets_its_whole_view_back_from_a_trigger_without_defaults(name):
    """The rerun trigger leaves out fields at their schema default; the stage fills them back in: for every stage and
    method the view it gets equals the view the config gives, and the trigger names no field at its default."""
    from rlhf.config import complete_view, load_config, trigger_view
    from rlhf.registry import SFT_BASELINE, STAGES, settings_view
    cfg = load_config(REPO / "config" / name)
    for stage, st in STAGES.items():
        if st.tool:
            continue
        for method in ([*cfg["methods"], SFT_BASELINE] if st.per_run else [None]):
            if stage == "grpo" and method == SFT_BASELINE:
                continue
            view = settings_view(cfg, stage, method)
            trigger = trigger_view(view)
            assert complete_view(trigger, stage) == view, (stage, method)
            if stage == "grpo":
                assert "elastic_reset_every" not in trigger["grpo"] and "grpo" in view
                assert trigger["grpo"]["max_new_tokens"] == cfg["grpo"]["max_new_tokens"] != 53  # set: kept

def test_the_default_config_and_its_file_give_identical_jobs(tmp_path):
    """`snakemake` and `snakemake --configfile config/miniature.yaml` are the same experiment, command for command."""
    def dry(*args):
        out = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p", "--cores", "1", *args],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return sorted(line for line in out.stdout.splitlines() if " -m rlhf " in line)  # the jobs' commands
    plain = dry()
    from rlhf.config import load_config
    miniature = load_config(REPO / "config" / "miniature.yaml")
    assert sum("-m rlhf grpo --settings" in line for line in plain) == len(miniature["methods"]) * len(miniature["seeds"])
    assert dry("--configfile", str(REPO / "config" / "miniature.yaml")) == plain
    assert not any("miniature.yaml" in line for line in plain)  # no command names the config file


def _under(path: Path, roots) -> bool:
    """path is a declared path, inside one, or inside the atomic temporary sibling (<name>.tmp-*) of one."""
    return any(p == r or p.parent == r.parent and p.name.startswith(f"{r.name}.tmp-")
               for r in roots for p in (path, *path.parents))


def stages_within_their_declarations(trace_dir: Path, results: Path) -> set[str]:
    """Check every traced stage process (rlhf.cli.trace_file_access) against its declared files; the stages seen."""
    root = results.resolve()
    traces = sorted(trace_dir.glob("*.jsonl"))
    seen = set()
    for trace in traces:
        head, *events = [json.loads(line) for line in trace.read_text().splitlines()]
        stage, given = head["stage"], head["given"]
        seen.add(stage)
        def paths(kind, given=given):
            return [Path(p).resolve() for v in given[kind].values() for p in (v if isinstance(v, list) else [v])]
        inputs, writable = paths("inputs"), paths("outputs") + paths("work")
        touched = [(Path(e["path"]).resolve(), e) for e in events if root in Path(e["path"]).resolve().parents]
        for path, e in touched:
            writes = e["event"] in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") or \
                any(c in e["mode"] for c in "wax+")
            if e["event"] in ("os.mkdir", "os.scandir", "os.listdir") and any(path in w.parents for w in writable):
                continue  # the folders an output lives in: made, and listed for stale temporaries of an atomic write
            allowed = writable if writes else inputs + writable
            assert _under(path, allowed), f"{stage} {e['event']} {path}: not declared by its rule"
        for path in inputs:
            assert any(p == path or path in p.parents for p, _ in touched), f"{stage} never read its input {path}"
    return seen


@pytest.mark.slow
def test_each_stage_touches_only_the_files_its_rule_declares(micro_snakemake):
    """Every stage process of the micro run recorded what it opened, listed, wrote, renamed and deleted under the
    experiment (Python audit events): reads stay inside its declared inputs and outputs, writes inside its outputs
    (or their atomic temporary siblings) and its work folder, and every declared input is read."""
    cfg, _, run = micro_snakemake
    assert run.returncode == 0, run.stderr[-3000:]
    seen = stages_within_their_declarations(cfg.parent / "trace", cfg.parent / "results" / "micro")
    assert seen == {"data", "base", "sft", "sample", "label", "rm", "grpo", "evaluate", "certify", "report"}


def test_snakemake_config_error_names_the_field(tmp_path):
    cfg = write_config(tmp_path, grpo={"stepz": 1})
    out = snakemake(cfg, "-n")
    assert out.returncode != 0
    assert "unknown key grpo.stepz" in out.stdout + out.stderr


PAPER_CONFIGS = sorted(p for p in (REPO / "config" / "paper").glob("*.yaml") if not p.name.endswith(".base.yaml"))


def _module_name(path: Path) -> str:
    return re.sub(r"\W", "_", path.stem)


@pytest.fixture(scope="module")
def paper_dags(tmp_path_factory) -> str:
    """Every paper config's whole DAG in ONE dry run through the Slurm profile: each config a module of the pipeline's
    Snakefile with its rules prefixed by its name (as workflow/tables.smk loads experiments), so one Snakemake process
    builds all of them instead of one process per config."""
    folder = tmp_path_factory.mktemp("paper_dags")
    lines = ["from rlhf.config import load_config", "from rlhf.paths import Paths", "TARGETS = []"]
    for path in PAPER_CONFIGS:
        name = _module_name(path)
        lines += [f"_cfg = load_config({str(path)!r})",
                  f"workflow.module({name!r}, snakefile={str(REPO / 'Snakefile')!r}, config=_cfg)",
                  f"workflow.userule(rules=['*'], from_module={name!r}, exclude_rules=[], "
                  f"name_modifier={name + '_*'!r})(lambda: None)",
                  "TARGETS.append(str(Paths.from_config(_cfg).report))"]
    (folder / "Snakefile").write_text("\n".join(lines) + "\n\nrule every_paper_config:\n    input: TARGETS\n")
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(folder / "Snakefile"), "--directory",
                          str(folder), "-n", "--profile", str(REPO / "profiles" / "slurm"), "every_paper_config"],
                         capture_output=True,
                         text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_builds_its_dag(path, paper_dags):
    """Every paper experiment's DAG builds through the Slurm profile (dry run): no base model to build,
    methods x seeds policies, and GPU rules that never set `tasks`."""
    from rlhf.cluster import launcher
    from rlhf.config import load_config
    cfg = load_config(path)
    rules = {rule for rule in STAGES if not STAGES[rule].tool}
    prefix = _module_name(path) + "_"
    scheduled = {rule.removeprefix(prefix): n for rule, n in jobs(paper_dags).items()
                 if rule.startswith(prefix) and rule.removeprefix(prefix) in rules}
    runs = len(cfg["methods"]) * len(cfg["seeds"])
    dpo = len(cfg.get("dpo", {}).get("methods", {})) * len(cfg["seeds"])  # GR Table 1's DPO / TR-DPO rows
    preferences = {} if "rlvr" in cfg else {"sample": 1, "label": 1, "rm": 1, "certify": 1}  # RLVR: no pairs, no RM
    from rlhf.registry import ensemble_members
    kinds = {m.get("reward", cfg["grpo"]["reward"]) for m in cfg["methods"].values()}
    members = len(ensemble_members(cfg)) if "uwo" in kinds else 0
    extra = {**({"dpo": dpo} if dpo else {}), **({"rm_member": members} if members else {}),
             **({"advpo": 1} if "advpo" in kinds else {}),
             **({"bspo": 1} if "bspo" in kinds else {})}  # the baselines' jobs (SignCert Table 1, GR Table 1)
    assert scheduled == {"data": 1, "sft": 1, **preferences, "grpo": runs, **extra, "evaluate": runs + dpo + 1,
                         "report": 1}
    assert bool(dpo) == path.stem.startswith("gr-tldr")
    assert bool(members) == ("bspo" in kinds) == ("advpo" in kinds) == path.stem.startswith("signcert")
    if "rlvr" in cfg:  # an instruct model starts as it is: its sft job only saves it, on one GPU
        assert cfg["sft"]["epochs"] == 0 and launcher(cfg, "sft") == "python"


def test_rule_resources_come_from_the_config(tmp_path):
    from rlhf.cluster import snakemake_resources
    from rlhf.config import load_config
    cfg = load_config(REPO / "config" / "paper" / "gr-tldr-pythia-1b.yaml")
    assert snakemake_resources(cfg, "grpo") == {"mem_mb": 256000, "runtime": 2880, "cpus_per_task": 32, "gpu": 8}
    assert "gpu" not in snakemake_resources(cfg, "report")
    alpaca = load_config(REPO / "config" / "paper" / "gr-alpaca-qwen2.5-3b.yaml")
    assert "gpu" not in snakemake_resources(alpaca, "label")  # the API judge needs no GPU
    for rule in ("data", "sft", "sample", "label", "rm", "grpo", "evaluate", "certify", "report"):
        assert not {"tasks", "tasks_per_gpu"} & set(snakemake_resources(cfg, rule))
    dry = snakemake(write_config(tmp_path, resources={"jobs": {"grpo": {"cpus": 2, "mem_mb": 1234}}}), "-n")
    assert "cpus_per_task=2, mem_mb=1234" in dry.stdout


def test_multi_gpu_grpo_runs_under_torchrun(tmp_path):
    """A GRPO job with several GPUs starts one rank per GPU; everything else (and one GPU) is one process."""
    from rlhf.cluster import launcher
    from rlhf.config import load_config
    cfg = load_config(REPO / "config" / "paper" / "signcert-tldr-pythia-1b.yaml")
    assert launcher(cfg, "grpo") == "torchrun --standalone --nproc-per-node 8"
    assert launcher(cfg, "sft") == launcher(cfg, "rm") == launcher(cfg, "grpo")
    assert launcher(cfg, "sample") == launcher(cfg, "evaluate") == "python"
    two = write_config(tmp_path, resources={"jobs": {"grpo": {"gpus": 2}}})
    dry = snakemake(two, "-n", "-p", str(tmp_path / "results" / "micro" / "grpo" / "noreg" / "seed0" / "policy"))
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "torchrun --standalone --nproc-per-node 2 -m rlhf grpo" in dry.stdout
    odd = write_config(tmp_path, resources={"jobs": {"grpo": {"gpus": 3}}})
    bad = snakemake(odd, "-n")
    assert bad.returncode != 0 and "does not split over the 3 GPUs" in bad.stdout + bad.stderr


def test_conda_environments_agree_with_pyproject():
    """The rules' conda envs pin what vllm 0.33 needs (torch 2.14.0 on GPU, transformers <5.21 everywhere)."""
    import tomllib

    import yaml
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    transformers = next(d for d in deps if d.startswith("transformers"))
    for name, torch_pin in (("cpu", "torch==2.13.0"), ("gpu", "torch==2.14.0")):
        env = yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert torch_pin in pip and transformers in pip, name
    assert "vllm==0.33.*" in pip


def test_conda_environments_deploy_the_way_snakemake_creates_them(tmp_path):
    """`--sdm conda` (snakemake/deployment/conda.py, 9.x) copies an env file to .snakemake/conda/<hash>.yaml and creates
    the environment from that copy, then copies <env>.post-deploy.sh beside it and runs it with the environment active
    from the working directory. So no requirement may be a path (`-e ..` resolved from the copy's folder names
    .snakemake/, not the workflow), and the post-deploy script must install the workflow from where the Snakefile says
    it is, whatever the working directory."""
    import shlex

    import yaml
    conda = tmp_path / "work" / ".snakemake" / "conda"
    conda.mkdir(parents=True)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(tmp_path / 'calls'))}\n")
    (shim / "python").chmod(0o755)
    for name in ("cpu", "gpu"):
        env_file = REPO / "envs" / f"{name}.yaml"
        copy = conda / f"{name}hash.yaml"
        copy.write_text(env_file.read_text())
        pip = next(d["pip"] for d in yaml.safe_load(copy.read_text())["dependencies"] if isinstance(d, dict))
        for requirement in pip:
            target = requirement.removeprefix("-e").strip()
            assert not target.startswith((".", "/", "file:")), f"{name}.yaml: {requirement!r} is a path"
        deploy = env_file.with_suffix("").with_name(f"{name}.post-deploy.sh")  # Snakemake's replace_suffix
        assert deploy.is_file(), f"no {deploy.name}: the environment would lack the project"
        copied = conda / f"{name}hash.post-deploy.sh"
        copied.write_text(deploy.read_text())
        env = {"PATH": f"{shim}:/usr/bin:/bin", "RLHF_WORKFLOW_ROOT": str(REPO)}
        done = subprocess.run(["bash", str(copied)], cwd=tmp_path / "work", env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        calls = (tmp_path / "calls").read_text().splitlines()
        assert calls[-2:] == [f"-m pip install --quiet -e {REPO}", "-c import rlhf.cli"], calls
        unset = subprocess.run(["bash", str(copied)], cwd=tmp_path / "work", env={"PATH": env["PATH"]},
                               capture_output=True, text=True)
        assert unset.returncode != 0 and "RLHF_WORKFLOW_ROOT: is set by the Snakefile" in unset.stderr
    assert 'os.environ["RLHF_WORKFLOW_ROOT"] = ROOT' in (REPO / "Snakefile").read_text()


# Here, not in tests/test_tables.py, because it reads micro_snakemake: a session fixture is built once per pytest-xdist
# worker, and `make test` gives each worker whole files (--dist loadfile), so a second file using it on the other
# worker would build the micro DAG again (~105 s of CPU).
def test_the_tables_workflow_reuses_an_experiments_results_and_its_report_shows_every_table_and_figure(
        micro_snakemake, tmp_path):
    """On the micro DAG already run by the pipeline's own Snakefile, the tables workflow schedules only the table and
    the figure: the experiment's module sees its finished jobs (same commands, params and inputs), and the table holds
    the evaluations' own numbers. Then `snakemake --report` embeds both with their captions, and a real headless
    browser renders the report (a screenshot with content)."""
    import base64
    import csv
    import shutil

    import numpy as np
    from matplotlib.image import imread

    from tests.test_tables import _spec
    cfg, _, run = micro_snakemake
    assert run.returncode == 0, run.stderr[-3000:]
    specs = tmp_path / "specs"
    specs.mkdir()
    _spec(specs, "micro-table", title="Micro table", metric="win_rate", experiment=str(cfg), columns={"micro": {}},
          rows={"SFT": {"method": "sft"}, "GR": {"method": "gr"}})
    _spec(specs, "micro-figure", figure="curve", title="Micro figure", x="eval/kl", y="eval/win_rate",
          methods=["noreg", "gr"], panels={"micro": {"experiment": str(cfg)}})
    _spec(specs, "micro-bench", title="Micro bench", source="bench", metric="step", experiment=str(cfg),
          columns={"cpu": {}}, rows={"Dr.GRPO": {"method": "noreg"}})
    out = tmp_path / "tables"
    command = [*SNAKEMAKE, "-s", str(REPO / "workflow" / "tables.smk"), "--directory", str(cfg.parent),
               "--config", f"tables={specs}", f"tables_dir={out}"]
    dry = subprocess.run([*command, "-n", "--cores", "1"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert jobs(dry.stdout) == {"table_micro_table": 1, "figure_micro_figure": 1, "table_micro_bench": 1, "tables": 1}
    done = subprocess.run([*command, "--cores", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["row"]: r for r in csv.DictReader((out / "micro-table.csv").open())}
    expected = json.loads((cfg.parent / "results" / "micro" / "eval" / "gr" / "seed0" / "metrics.json").read_text())
    assert float(rows["GR"]["mean"]) == pytest.approx(expected["win_rate"]) and rows["GR"]["n"] == "1"
    assert all((out / f"micro-table.{suffix}").is_file() for suffix in ("md", "tex", "html"))
    def bench_row():
        return next(csv.DictReader((out / "micro-bench.csv").open()))
    assert bench_row()["mean"] == "" and bench_row()["missing"].endswith("bench/bench.json")  # make bench not run
    bench = cfg.parent / "results" / "micro" / "bench" / "bench.json"
    bench.parent.mkdir(exist_ok=True)
    bench.write_text(json.dumps({"results": {"noreg": {"step": 0.4}}}))
    try:  # a bench.json made after the table re-renders it, and only it
        dry = subprocess.run([*command, "-n", "--cores", "1"], capture_output=True, text=True, timeout=300)
        assert jobs(dry.stdout) == {"table_micro_bench": 1, "tables": 1}, dry.stdout[-3000:]
        done = subprocess.run([*command, "--cores", "1"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and float(bench_row()["mean"]) == 0.4, done.stderr[-3000:]
    finally:
        bench.unlink()

    report = tmp_path / "report.html"
    made = subprocess.run([*command, "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    page = report.read_text()
    for item in ("micro-table.html", "micro-figure.png"):  # each embedded whole, with its caption's title
        assert base64.b64encode((out / item).read_bytes()).decode() in page, item
    assert "Micro table" in page and "Micro figure" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (make test installs Debian's where apt can)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--virtual-time-budget=8000", f"--screenshot={shot}",
                    report.as_uri()], capture_output=True, text=True, timeout=120)
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (900, 1280) and np.std(image) > 0.05  # the rendered app, not a blank page
    assert (np.abs(image - image.mean(axis=(0, 1))).sum(axis=2) > 0.3).mean() > 0.02  # with text and graphics
