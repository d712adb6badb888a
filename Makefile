# Two entry points: `make demo` and `make test`. Both create the CPU environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORES  ?= 2
CONFIG ?= config/miniature.yaml

.PHONY: demo test bench env clean-results

env: $(STAMP)

# torch first and pinned: it is the local CPU build; any other spec would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	. $(VENV)/bin/activate && time snakemake --cores $(CORES) --configfile $(CONFIG) && cat results/miniature/report/table.md

# Times GRPO steps on the miniature (builds SFT and RM first if needed); prints and writes results/miniature/bench/.
bench: $(STAMP)
	. $(VENV)/bin/activate && snakemake results/miniature/rm --cores $(CORES) --configfile $(CONFIG) \
		&& python -m rlhf bench --config $(CONFIG)

test: $(STAMP)
	. $(VENV)/bin/activate && python -m pytest -q

clean-results:
	rm -rf results/*
