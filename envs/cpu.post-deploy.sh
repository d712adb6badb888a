#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside the new environment after creating it from its copy of cpu.yaml /
# gpu.yaml in .snakemake/conda/, and from the working directory (--directory): neither place is the workflow, so a
# relative path in the env file (`-e ..`) cannot name it. The Snakefile exports the workflow's folder as
# RLHF_WORKFLOW_ROOT; the project installs from there with its dependencies (those the env file pins are kept).
set -euo pipefail
root="${RLHF_WORKFLOW_ROOT:?is set by the Snakefile: create the environments through snakemake --sdm conda}"
python -m pip install --quiet -e "$root"
python -c "import rlhf.cli"
