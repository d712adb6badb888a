"""The papers' tables from table specs (config/tables/*.yaml), with the published numbers beside ours.

A spec names a title, its rows and columns, and what fills each cell. A cell is the merge of the spec's defaults, its
row's entry and its column's entry (later wins), so either axis can carry the experiment and the other the method
(GR Table 1: columns are models = experiments, rows are methods; SignCert Tables 8-11: rows are RM epochs =
experiments, columns are quantiles = methods). Cell keys:

  experiment   an experiment config (path from the repository root); its results are read where it puts them. A
               list: replicas of one experiment (the whole pipeline rerun with another seed, as the papers' spreads
               are), whose runs are pooled as the cell's seeds
  method       a method of that experiment (`sft`: the SFT policy itself, a DPO-family name: the dpo stage's policy),
               or a pattern (`kl-*`) / list of them: the matching method with the best mean, as the papers report a
               tuned sweep (named in the table's notes; the whole sweep is run)
  source       evaluation (default): the evaluate stage's JSON per seed | training: a GRPO metrics curve per seed |
               bench: make bench's seconds per step | difficulty: the report's accuracy per difficulty bin and step
  metric       the value read (win_rate, accuracy, onpolicy/rm_accuracy, step, ...)
  selection    final (default) | early_stopping: the step with the best training-time `select_on` (GR Table 2)
  select_on    early stopping's selection metric, an eval/ key of the GRPO metrics (default train_win_rate: the
               win rate on training prompts, GR Sec. 5.1's "training winrate", so the reported held-out value at
               that step is not the one that chose it)
  reduce       training source: mean (over the evaluation steps, SignCert Tables 8-9) | final
  bin, step    difficulty source: the initial-accuracy bin and evaluation step (GR Table 4)
  scale        multiplies the value (100: percent)

Each cell is the mean +- standard deviation over the experiment's seeds (as the papers report) with n; a cell with no
results says `missing` and the table lists what is missing (experiment, method, seeds, the file), never a zero.
Early stopping reports the held-out evaluation logged during training at the selected step (the only evaluation of a
checkpoint that is not the last); the selected steps are listed with the table.
Besides rows and columns a spec may give `cells` ("row | column" -> cell keys: one cell's own, e.g. a paper row that
is one named run in one column), `paper` (the published numbers, a list per row) and `paper_spread` (their +- where
the paper gives one).

`python -m rlhf.tables [SPEC ...]` renders what exists; `snakemake -s workflow/tables.smk` runs whatever the specs
need first (the experiments' own DAGs as modules, so `--profile profiles/slurm` applies) and then renders.
Writes <out>/<spec name>.{md,csv,tex,html}.
"""
from __future__ import annotations

import argparse
import csv
from html import escape
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.errors import ConfigError, RLHFError
from rlhf.figures import is_figure, load_figure, render
from rlhf.io import atomic_file
from rlhf.results import CellResult, experiment_config, read_cell, resolve

CELL_KEYS = {"experiment", "method", "source", "metric", "selection", "select_on", "reduce", "bin", "step", "scale",
             "decimals"}
SOURCES = ("evaluation", "training", "bench", "difficulty")


@dataclass(frozen=True)
class Spec:
    path: Path
    title: str
    rows: dict[str, dict]
    columns: dict[str, dict]
    defaults: dict
    paper: dict[str, list]
    notes: str = ""
    overrides: dict[tuple[str, str], dict] = field(default_factory=dict)  # one cell's own keys
    paper_spread: dict[str, list] = field(default_factory=dict)          # the paper's +- per row, where it has one

    @property
    def name(self) -> str:
        return self.path.stem

    def cell(self, row: str, column: str) -> dict:
        cell = {"source": "evaluation", "selection": "final", "select_on": "train_win_rate", "reduce": "mean",
                "scale": 1, "decimals": 1, **self.defaults, **self.rows[row], **self.columns[column],
                **self.overrides.get((row, column), {})}
        needed = ("experiment", "method") + (("bin", "step") if cell["source"] == "difficulty" else ("metric",))
        for key in needed:
            if key not in cell:
                raise ConfigError(f"{self.path}: cell ({row}, {column}) has no {key} (set it on the spec, the row or "
                                  "the column)")
        return cell

    def cells(self):
        return [(r, c, self.cell(r, c)) for r in self.rows for c in self.columns]

    def experiments(self) -> list[Path]:
        return list(dict.fromkeys(path for _, _, cell in self.cells() for path in experiments_of(cell)))


def experiments_of(cell: dict) -> list[Path]:
    """A cell's experiment config, or its replicas' (a list), as paths."""
    names = cell["experiment"] if isinstance(cell["experiment"], list) else [cell["experiment"]]
    return [Path(n) for n in names]


def load_spec(path: str | Path) -> Spec:
    """A table spec, checked: one line naming the file and the field on any mistake."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the table spec ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a table spec is a mapping (title, rows, columns, ...)")
    unknown = set(raw) - {"title", "rows", "columns", "cells", "paper", "paper_spread", "notes"} - CELL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown field {sorted(unknown)[0]!r} (allowed: title, rows, columns, cells, paper, "
                          f"paper_spread, notes, and the cell keys {', '.join(sorted(CELL_KEYS))})")
    axes = {}
    for axis in ("rows", "columns"):
        entries = raw.get(axis)
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: {axis} must map labels to cell keys (e.g. 'SFT: {{method: sft}}')")
        for label, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) - CELL_KEYS:
                bad = sorted(set(entry) - CELL_KEYS)[0] if isinstance(entry, dict) else type(entry).__name__
                raise ConfigError(f"{path}: {axis}.{label}: {bad!r} is not a cell key ({', '.join(sorted(CELL_KEYS))})")
        axes[axis] = {str(k): v for k, v in entries.items()}
    published = {}
    for field_name in ("paper", "paper_spread"):
        published[field_name] = {str(k): v for k, v in (raw.get(field_name) or {}).items()}
        for label, values in published[field_name].items():
            if label not in axes["rows"]:
                raise ConfigError(f"{path}: {field_name}.{label}: not a row label ({', '.join(axes['rows'])})")
            if not isinstance(values, list) or len(values) != len(axes["columns"]):
                raise ConfigError(f"{path}: {field_name}.{label}: give one value per column "
                                  f"({len(axes['columns'])}; null where the paper has none)")
    overrides = {}
    for key, entry in (raw.get("cells") or {}).items():
        row, _, column = str(key).partition(" | ")
        if row not in axes["rows"] or column not in axes["columns"]:
            raise ConfigError(f"{path}: cells.{key}: not 'row | column' of this table's labels")
        if not isinstance(entry, dict) or set(entry) - CELL_KEYS:
            raise ConfigError(f"{path}: cells.{key}: a mapping of cell keys ({', '.join(sorted(CELL_KEYS))})")
        overrides[row, column] = entry
    spec = Spec(path, str(raw.get("title", path.stem)), axes["rows"], axes["columns"],
                {k: raw[k] for k in CELL_KEYS if k in raw}, published["paper"], str(raw.get("notes", "")),
                overrides, published["paper_spread"])
    for _, _, cell in spec.cells():
        if cell["source"] not in SOURCES:
            raise ConfigError(f"{path}: source {cell['source']!r}: one of {', '.join(SOURCES)}")
        if cell["selection"] not in ("final", "early_stopping"):
            raise ConfigError(f"{path}: selection {cell['selection']!r}: final or early_stopping")
    return spec


@dataclass
class Table:
    spec: Spec
    cells: dict[tuple[str, str], CellResult]
    formats: dict[tuple[str, str], int]
    unreadable: dict[str, str]  # experiment config -> why it could not be loaded

    def missing(self) -> dict[tuple[str, str], list[str]]:
        return {k: c.missing for k, c in self.cells.items() if c.missing}


def build(spec: Spec) -> Table:
    configs, unreadable = {}, {}
    for path in spec.experiments():
        try:
            configs[path] = experiment_config(path)
        except RLHFError as e:
            unreadable[str(path)] = str(e)
    cells, formats = {}, {}
    for row, column, cell in spec.cells():
        paths = experiments_of(cell)
        formats[row, column] = cell["decimals"]
        unread = [p for p in paths if p not in configs]
        cells[row, column] = read_cell(cell, [configs[p] for p in paths]) if not unread else CellResult(
            missing=[f"{p} (unreadable config)" for p in unread])
    return Table(spec, cells, formats, unreadable)


def _number(value, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def ours_text(c: CellResult, decimals: int) -> str:
    if c.empty:
        return "– (empty bin)"
    if not c.values:
        return "missing"
    n = c.n if c.n is not None else len(c.values)
    spread = f" ± {_number(c.std, decimals)}" if c.n is None and len(c.values) > 1 else ""
    partial = f" ({len(c.missing)} missing)" if c.missing else ""
    return f"{_number(c.mean, decimals)}{spread} (n={n}){partial}"


def paper_value(table: Table, row: str, column: str):
    values = table.spec.paper.get(row)
    return None if values is None else values[list(table.spec.columns).index(column)]


def paper_spread(table: Table, row: str, column: str):
    values = table.spec.paper_spread.get(row)
    return None if values is None else values[list(table.spec.columns).index(column)]


def paper_text(table: Table, row: str, column: str, decimals: int) -> str:
    spread = paper_spread(table, row, column)
    return _number(paper_value(table, row, column), decimals) + (
        f" ± {_number(spread, decimals)}" if spread is not None else "")


def notes_lines(table: Table) -> list[str]:
    lines = []
    chosen = {k: c for k, c in table.cells.items() if c.chosen_of > 1}
    if chosen:
        lines.append("Best of a sweep (by the mean shown): " + "; ".join(
            f"{r} / {col}: {c.method} of {c.chosen_of}" for (r, col), c in chosen.items()))
    steps = {k: c.steps for k, c in table.cells.items() if c.steps}
    if steps:
        lines.append("Early stopping, selected steps per seed: " + "; ".join(
            f"{r} / {c}: {', '.join(map(str, s))}" for (r, c), s in steps.items()))
    for path, why in table.unreadable.items():
        lines.append(f"Experiment {path} could not be read: {why}")
    missing = table.missing()
    if missing:
        by_experiment: dict[str, list[str]] = {}
        for (r, c), files in missing.items():
            experiment = " ".join(map(str, experiments_of(table.spec.cell(r, c))))
            by_experiment.setdefault(experiment, []).extend(files)
        for experiment, files in by_experiment.items():
            lines.append(f"Missing from experiment {experiment}: {len(files)} file(s), e.g. {files[0]} (run "
                         f"`snakemake -s workflow/tables.smk` or `snakemake --configfile {experiment}`)")
    return lines


def markdown(table: Table) -> str:
    spec, columns = table.spec, list(table.spec.columns)
    head = "| | " + " | ".join(f"{c} (ours) | {c} (paper)" for c in columns) + " |"
    lines = [f"**{spec.title}**", "", head, "|---|" + "---|---|" * len(columns)]
    for row in spec.rows:
        cells = [f"{ours_text(table.cells[row, c], table.formats[row, c])} | "
                 f"{paper_text(table, row, c, table.formats[row, c])}" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    extra = ([spec.notes.strip()] if spec.notes.strip() else []) + notes_lines(table)
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "column", "experiment", "method", "mean", "std", "n", "values", "paper", "paper_spread",
                "selected_steps", "missing"])
    for (row, column), c in table.cells.items():
        cell = table.spec.cell(row, column)
        w.writerow([row, column, " ".join(map(str, experiments_of(cell))), c.method, c.mean, c.std if c.n is None else "",
                    c.n if c.n is not None else len(c.values), " ".join(f"{v:g}" for v in c.values),
                    paper_value(table, row, column), paper_spread(table, row, column), " ".join(map(str, c.steps)),
                    " ".join(c.missing)])
    return buf.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex(table: Table) -> str:
    spec, columns = table.spec, list(table.spec.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + latex_escape(spec.title) + "}",
             r"\begin{tabular}{l" + "rr" * len(columns) + "}", r"\toprule",
             " & " + " & ".join(r"\multicolumn{2}{c}{" + latex_escape(c) + "}" for c in columns) + r" \\",
             " & " + " & ".join("ours & paper" for _ in columns) + r" \\", r"\midrule"]
    for row in spec.rows:
        cells = []
        for c in columns:
            result, decimals = table.cells[row, c], table.formats[row, c]
            ours = "--" if result.mean is None else (
                _number(result.mean, decimals) + (r" $\pm$ " + _number(result.std, decimals)
                                                  if result.n is None and len(result.values) > 1 else ""))
            paper = paper_value(table, row, c)
            cells += [ours, "--" if paper is None else paper_text(table, row, c, decimals).replace("±", r"$\pm$")]
        lines.append(latex_escape(row) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def html(table: Table) -> str:
    """The table as a small HTML page (what `snakemake --report` shows)."""
    spec, columns = table.spec, list(table.spec.columns)
    head = "".join(f"<th>{escape(c)} (ours)</th><th>{escape(c)} (paper)</th>" for c in columns)
    rows = "".join(
        f"<tr><th>{escape(r)}</th>" + "".join(
            f"<td>{escape(ours_text(table.cells[r, c], table.formats[r, c]))}</td>"
            f"<td>{escape(paper_text(table, r, c, table.formats[r, c]))}</td>" for c in columns) + "</tr>"
        for r in spec.rows)
    notes = "".join(f"<p>{escape(line)}</p>" for line in ([spec.notes.strip()] if spec.notes.strip() else [])
                    + notes_lines(table))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(spec.title)}</title><style>"
            "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}table{border-collapse:collapse}</style>"
            f"</head><body><h3>{escape(spec.title)}</h3><table><tr><th></th>{head}</tr>{rows}</table>{notes}"
            "</body></html>\n")


def write(table: Table, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for suffix, text in (("md", markdown(table)), ("csv", csv_text(table)), ("tex", latex(table)),
                         ("html", html(table))):
        files[suffix] = out / f"{table.spec.name}.{suffix}"
        with atomic_file(files[suffix]) as f:
            f.write(text)
    return files


def spec_paths(selection: list[str]) -> list[Path]:
    """Spec files from paths or folders (a folder: its *.yaml, sorted)."""
    paths = []
    for item in selection:
        p = resolve(item)
        if p.is_dir():
            paths += sorted(p.glob("*.yaml"))
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"{item}: no such table spec or folder of specs")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", default=["config/tables"], help="spec files or folders (default: config/tables)")
    p.add_argument("--out", default="results/tables", help="where the tables go (default: results/tables)")
    args = p.parse_args(argv)
    try:
        for path in spec_paths(args.specs):
            if is_figure(path):
                png, missing = render(load_figure(path), Path(args.out))
                print(f"tables: {path.stem}: figure -> {png}" + (f" ({len(missing)} run(s) missing, e.g. "
                                                                 f"{missing[0]})" if missing else ""))
                continue
            table = build(load_spec(path))
            files = write(table, Path(args.out))
            missing = sum(bool(c.missing) for c in table.cells.values())
            print(f"tables: {table.spec.name}: {len(table.cells) - missing}/{len(table.cells)} cells complete "
                  f"-> {files['md']}")
    except RLHFError as e:
        print(f"tables: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
