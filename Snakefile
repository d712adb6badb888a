# The pipeline DAG. All logic lives in the `rlhf` package; each rule is one `python -m rlhf <stage>` call.
#   snakemake --cores 2                                  # the embedded miniature (config/miniature.yaml)
#   snakemake --cores 8 --configfile config/other.yaml   # another experiment
#   snakemake --cores 2 --config 'grpo={lr: 1e-4}'       # overrides, merged into the experiment's config
#
# What reruns a job is exactly what determines its output (rlhf/registry.py): its declared input files, its own view of
# the config (params.settings: e.g. grpo's resolved method settings, never another stage's section or the config
# file's name; fields at their schema default left out, so a new setting reruns nothing: rlhf/config.py) and the
# rule's shell command, which is the same text for every config.
import os
import re
import shlex

from rlhf.cli import SIDE_ENV, add_side_settings
from rlhf.cluster import job_spec, launcher, snakemake_resources
from rlhf.config import config_from_mapping, load_config, trigger_view
from rlhf.paths import Paths
from rlhf.registry import SFT_BASELINE, STAGES, canonical, dpo_methods, settings_view, side_view, used_stages

# This file's folder, also when it runs as a module of workflow/tables.smk (whose folder is workflow.basedir then).
ROOT = str(workflow.current_basedir)
# envs/*.post-deploy.sh installs the project from here into each conda environment (--sdm conda)
os.environ["RLHF_WORKFLOW_ROOT"] = ROOT
DEFAULT_CONFIG = os.path.join(ROOT, "config", "miniature.yaml")

# Snakemake's `config`: the merge of --configfile and --config (empty: the miniature). Validated by the same code as
# the stage CLI, so a typo fails the same way everywhere.
_experiment = config_from_mapping(config) if config else load_config(DEFAULT_CONFIG)
config.clear()
config.update(_experiment)
P = Paths.from_config(config)
METHODS = list(config["methods"]) + dpo_methods(config)  # GRPO methods, then the DPO family (dpo section)
SEEDS = config["seeds"]
# Logging and API-client settings reach every stage through the environment: they change no artifact, so they are
# no rule's rerun trigger (a Slurm job re-reads this file and sets it again). Keyed by the experiment's results folder:
# one Snakemake process can hold several experiments (workflow/tables.smk loads each as a module), and a stage takes
# the entry its outputs live under (rlhf/cli.py).
os.environ[SIDE_ENV] = add_side_settings(os.environ.get(SIDE_ENV), P.root, side_view(config))


def _files(stage, kind, wildcards=None):
    if STAGES[stage].per_member:  # a member's files are keyed by k where a run's are by method
        method, seed = (int(wildcards.member) if wildcards else "{member}"), None
    else:
        method, seed = (wildcards.method, wildcards.seed) if wildcards else ("{method}", "{seed}")
    files = getattr(STAGES[stage], kind)(P, config, method, seed)
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in files.items()}


def inputs(stage):
    """The stage's declared inputs (a function of the wildcards for a per-method-and-seed stage)."""
    st = STAGES[stage]
    return lambda w: _files(stage, "inputs", w if st.per_run or st.per_member else None)


def outputs(stage):
    """The stage's declared outputs; a path without a suffix is a folder."""
    return {k: directory(v) if not os.path.splitext(v)[1] else v for k, v in _files(stage, "outputs").items()}


def params(stage):
    """The rule's params: the stage's config view (its rerun trigger), its launcher and its work folder."""
    st = STAGES[stage]
    view = ((lambda w: canonical(trigger_view(settings_view(config, stage, w.method)))) if st.per_run
            else canonical(trigger_view(settings_view(config, stage))))
    work = {k: (lambda w, v=v: v.format(method=w.method, seed=w.seed)) if st.per_run else v
            for k, v in _files(stage, "work").items()}
    return {"settings": view, "launcher": launcher(config, stage), "inputs": input_args(stage), **work}


def input_args(stage):
    """The command's `--input NAME PATH...` for each declared input, a list input only where it is non-empty. Built
    from the job's inputs (a derived param: never a rerun trigger itself, the input trigger covers the files), so the
    rule's command text stays the same when a release adds an optional list input (a new baseline's artifact to the
    grpo rule): Snakemake's code trigger compares that text, and would rerun every run of the rule."""
    st = STAGES[stage]

    def args(wildcards, input):
        named = [(k, list(input[k]) if st.is_list(k) else [input[k]]) for k in input.keys()]
        return " ".join(" ".join(["--input", k, *map(shlex.quote, paths)]) for k, paths in named if paths)
    return args


def rlhf(stage):
    """The shell command of a rule: the stage CLI given its view of the config and its declared files, logging to {log}
    (a failed attempt's log also copied to {log}.failed, which Snakemake does not delete before the next attempt: a
    job the profile retried keeps why it failed).
    The text depends on the stage only (and on which files it declares), never on the experiment's settings."""
    st = STAGES[stage]
    names = lambda kind: list(_files(stage, kind))
    files = " ".join(["{params.inputs}", *(f"--output {k} {{output.{k}:q}}" for k in names("outputs")),
                      *(f"--work {k} {{params.{k}:q}}" for k in names("work"))])
    run = (" --method {wildcards.method} --seed {wildcards.seed}" if st.per_run
           else " --member {wildcards.member}" if st.per_member else "")
    return (f"{{params.launcher}} -m rlhf {stage} --settings {{params.settings:q}} --threads {{threads}}{run} {files} "
            "> {log:q} 2>&1 || {{ status=$?; cp -f {log:q} {log:q}.failed; exit $status; }}")


def threads(rule):
    return job_spec(config, rule)["cpus"]


def conda_env(rule):
    """envs/gpu.yaml for rules that ask for GPUs, envs/cpu.yaml otherwise (used with --sdm conda)."""
    name = "gpu.yaml" if job_spec(config, rule)["gpus"] else "cpu.yaml"
    return os.path.join(ROOT, "envs", name)  # absolute: relative paths resolve from the rule file


def job_resources(rule):
    """gpu / cpus_per_task / mem_mb / runtime from config.resources.jobs (what profiles/slurm asks sbatch for)."""
    return snakemake_resources(config, rule)


def log(stage):
    st = STAGES[stage]
    return str(P.logs(f"{stage}_{{method}}_seed{{seed}}" if st.per_run else f"{stage}{{member}}" if st.per_member
                      else stage))


wildcard_constraints:
    method="|".join(re.escape(m) for m in [*METHODS, SFT_BASELINE]),
    seed=r"\d+",
    member=r"\d+",


rule all:
    input:
        str(P.report),


def command(stage, rule=None):
    """A rule's shell command. Snakemake evaluates the `shell:` expression twice: when the rule is defined (kept as the
    rule's shellcmd) and again when a job runs, inside the job's function, where the loop below has moved on to its
    last stage; that function has the job's rule name as a local, `rule`, so there the command is the one its rule
    kept (a module's rule, workflow/tables.smk, included)."""
    return workflow.get_rule(rule).shellcmd if rule else rlhf(stage)


# One rule per stage the experiment's DAG has (rlhf/registry.py: STAGES, used_stages); each rule's files, params and
# resources come from the registry, its command is `python -m rlhf <stage>` (docs/pipeline.md: the rule graph).
for _stage in used_stages(config):

    rule:
        name:
            _stage
        input:
            unpack(inputs(_stage)),
        output:
            **outputs(_stage),
        params:
            **params(_stage),
        priority: STAGES[_stage].priority
        conda:
            conda_env(_stage)
        threads: threads(_stage)
        resources:
            **job_resources(_stage),
        log:
            log(_stage),
        shell:
            command(_stage, locals().get("rule"))
