# The pipeline DAG. All logic lives in the `rlhf` package; each rule is one `python -m rlhf <stage>` call.
#   snakemake --cores 2                                  # the embedded miniature (config/miniature.yaml)
#   snakemake --cores 8 --configfile config/other.yaml   # another experiment
#   snakemake --cores 2 --config 'grpo={lr: 1e-4}'       # overrides, merged and forwarded to every stage
import os
import re
import shlex

from rlhf.cluster import job_spec, launcher, snakemake_resources
from rlhf.config import load_config, overrides_from_snakemake
from rlhf.paths import Paths

DEFAULT_CONFIG = "config/miniature.yaml"

# Exactly one config file, loaded and validated by the same code as the CLI. (Snakemake's `configfile:`
# directive would deep-merge the default into a --configfile, mixing two experiments.)
if len(workflow.overwrite_configfiles) > 1:
    raise ValueError("pass a single --configfile (one experiment per invocation)")
CONFIG_FILE = str(workflow.overwrite_configfiles[0]) if workflow.overwrite_configfiles else DEFAULT_CONFIG
# `--config grpo='{steps: 5}'` is forwarded to every stage as an override (braces doubled: shell strings
# of rules are format templates).
_overrides = overrides_from_snakemake(dict(workflow.config_settings.config))
OVERRIDES = " ".join(shlex.quote(o) for o in _overrides).replace("{", "{{").replace("}", "}}")
config.clear()
config.update(load_config(CONFIG_FILE, _overrides))
P = Paths.from_config(config)
METHODS = list(config["methods"])
SEEDS = config["seeds"]
SFT_EVAL = "sft"  # evaluation of the SFT policy itself, a baseline row of the report


def rlhf(stage, extra=""):
    """The shell command of a rule: the stage CLI on this experiment's config, logging to {log}
    (under torchrun with one rank per GPU for a data-parallel stage that asks for several GPUs)."""
    return (f"{launcher(config, stage)} -m rlhf {stage} --config {shlex.quote(CONFIG_FILE)} --threads {{threads}} {extra} "
            f"{OVERRIDES} > {{log}} 2>&1")


def threads(rule):
    return job_spec(config, rule)["cpus"]


def conda_env(rule):
    """envs/gpu.yaml for rules that ask for GPUs, envs/cpu.yaml otherwise (used with --sdm conda)."""
    name = "gpu.yaml" if job_spec(config, rule)["gpus"] else "cpu.yaml"
    return os.path.join(workflow.basedir, "envs", name)  # absolute: relative paths resolve from the rule file


def job_resources(rule):
    """gpu / cpus_per_task / mem_mb / runtime from config.resources.jobs (what profiles/slurm asks sbatch for)."""
    return snakemake_resources(config, rule)


wildcard_constraints:
    method="|".join(re.escape(m) for m in [*METHODS, SFT_EVAL]),
    seed=r"\d+",


rule all:
    input:
        str(P.report),


include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/preferences.smk"
include: "workflow/rules/policy.smk"
include: "workflow/rules/report.smk"
