# The papers' tables (rlhf/tables.py), with whatever their experiments still need run first.
#
#   snakemake -s workflow/tables.smk --cores 2                                    # the miniature editions
#   snakemake -s workflow/tables.smk --profile profiles/slurm --config tables=config/tables/paper
#   snakemake -s workflow/tables.smk --config 'tables=[config/tables/paper/gr-table1.yaml]'
#   snakemake -s workflow/tables.smk --report results/tables/report.html    # the tables and figures, with captions
#
# Every experiment a selected spec names is loaded as a Snakemake module of the pipeline's own Snakefile (its rules
# prefixed with the experiment's name), so one DAG spans the experiments, each keeps its results, rerun triggers and
# cluster resources, and a table's rule waits for exactly the files its cells read. Outputs: results/tables/<spec>.*
# (a figure spec, with `figure:`, gives <spec>.png: rlhf/figures.py)
import os
import re
from pathlib import Path

from rlhf.config import load_config
from rlhf.figures import is_figure, load_figure
from rlhf.results import cell_files, resolve
from rlhf.tables import experiments_of, load_spec, spec_paths

SNAKEFILE = os.path.join(workflow.basedir, "..", "Snakefile")
_selection = config.get("tables", "config/tables/miniature")
_paths = spec_paths(_selection if isinstance(_selection, list) else [_selection])
SPECS = [load_spec(p) for p in _paths if not is_figure(p)]
FIGURES = [load_figure(p) for p in _paths if is_figure(p)]
OUT = config.get("tables_dir", "results/tables")
EXPERIMENTS = {path: load_config(resolve(path)) for spec in [*SPECS, *FIGURES] for path in spec.experiments()}


def rule_prefix(name):
    return re.sub(r"\W", "_", name)


_names = {}
for _path, _cfg in EXPERIMENTS.items():
    if _names.setdefault(_cfg["experiment"], _path) != _path:
        raise ValueError(f"{_path} and {_names[_cfg['experiment']]} are both experiment {_cfg['experiment']!r}: "
                         "they would share results/<experiment>/; give one its own `experiment:` name")


def table_inputs(spec):
    """What its cells (a figure: its panels) read. The DAG makes them, except make bench's timings (a step timed
    beside other jobs would measure them too): an input only where one exists, so a new bench.json re-renders the
    table on the next run and its absence leaves the cell `missing`."""
    cells = [cell for _, _, cell in spec.cells()] if hasattr(spec, "rows") else [spec.cell(p) for p in spec.panels]
    files = {(cell["source"], f) for cell in cells for path in experiments_of(cell)
             for _, f in cell_files(cell, EXPERIMENTS[path])}
    return sorted(str(f) for source, f in files if source != "bench" or f.exists())


report: "report/workflow.rst"


rule tables:
    input:
        [os.path.join(OUT, f"{spec.name}.{suffix}") for spec in SPECS for suffix in ("md", "csv", "tex", "html")],
        [os.path.join(OUT, f"{figure.name}.png") for figure in FIGURES],


for _spec in SPECS:

    rule:
        name:
            f"table_{rule_prefix(_spec.name)}"
        input:
            table_inputs(_spec),
        output:
            **{suffix: os.path.join(OUT, f"{_spec.name}.{suffix}") for suffix in ("md", "csv", "tex")},
            html=report(os.path.join(OUT, f"{_spec.name}.html"), caption="report/table.rst", category="Tables"),
        params:
            spec=str(_spec.path),
            title=_spec.title,
            notes=_spec.notes,
        localrule: True
        shell:
            "python -m rlhf.tables {params.spec:q} --out " + OUT


for _figure in FIGURES:

    rule:
        name:
            f"figure_{rule_prefix(_figure.name)}"
        input:
            table_inputs(_figure),
        output:
            report(os.path.join(OUT, f"{_figure.name}.png"), caption="report/figure.rst", category="Figures"),
        params:
            spec=str(_figure.path),
            title=_figure.title,
        localrule: True
        shell:
            "python -m rlhf.tables {params.spec:q} --out " + OUT


# One module per experiment: the internal form of `module <name>: snakefile: ...; config: ...` and
# `use rule * from <name> as <name>_*` (what Snakemake compiles those statements to), because the experiments are
# only known from the specs.
for _path, _cfg in EXPERIMENTS.items():
    _name = rule_prefix(_cfg["experiment"])
    workflow.module(_name, snakefile=SNAKEFILE, config=_cfg)
    workflow.userule(rules=["*"], from_module=_name, exclude_rules=[], name_modifier=f"{_name}_*")(lambda: None)
