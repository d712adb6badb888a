"""The papers' tables (rlhf/tables.py, workflow/tables.smk): specs, values over seeds, early stopping, the formats,
and the DAG that spans experiments."""
import json
import math
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO, SNAKEMAKE, jobs, write_config

from rlhf.errors import ConfigError
from rlhf.results import select_checkpoint
from rlhf.tables import build, csv_text, latex, latex_escape, load_spec, markdown


def _spec(tmp_path, name="t", **fields):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def _eval(root, method, seed, **metrics):
    folder = root / "eval" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_a_spec_with_a_missing_experiment_names_it_and_prints_no_number(tmp_path):
    cfg = write_config(tmp_path, seeds=[0, 1, 2])  # the micro experiment, never run here
    spec = load_spec(_spec(tmp_path, title="T", metric="win_rate", experiment=str(cfg), columns={"micro": {}},
                           rows={"SFT": {"method": "sft"}, "KL": {"method": "kl"}},
                           paper={"SFT": [17.8], "KL": [None]}))
    table = build(spec)
    text = markdown(table)
    assert "| SFT | missing | 17.8 |" in text and "| KL | missing | – |" in text
    assert f"Missing from experiment {cfg}: 4 file(s)" in text  # the SFT evaluation and kl's three seeds
    assert "results/micro/eval/sft/seed0" in text and "results/micro/eval/kl/seed2" in csv_text(table)
    assert not re.search(r"\b0\.0\b", text)


def test_mean_std_and_n_over_seeds_are_the_hand_computed_values(tmp_path):
    cfg = write_config(tmp_path, seeds=[0, 1, 2])
    root = tmp_path / "results" / "micro"
    for seed, value in enumerate([0.50, 0.60, 0.85]):
        _eval(root, "kl", seed, win_rate=value)
    _eval(root, "noreg", 0, win_rate=0.25)
    _eval(root, "noreg", 2, win_rate=0.75)  # seed 1 missing
    spec = load_spec(_spec(tmp_path, title="T", metric="win_rate", scale=100, experiment=str(cfg),
                           columns={"micro": {}}, rows={"KL": {"method": "kl"}, "No Reg": {"method": "noreg"}}))
    table = build(spec)
    kl, noreg = table.cells["KL", "micro"], table.cells["No Reg", "micro"]
    assert kl.mean == pytest.approx(65.0) and kl.std == pytest.approx(math.sqrt((15 ** 2 + 5 ** 2 + 20 ** 2) / 2))
    assert len(kl.values) == 3 and not kl.missing
    assert noreg.values == [25.0, 75.0] and noreg.std == pytest.approx(math.sqrt(2 * 25 ** 2))
    assert len(noreg.missing) == 1 and "noreg/seed1" in noreg.missing[0]
    text = markdown(table)
    assert "| KL | 65.0 ± 18.0 (n=3) | – |" in text and "50.0 ± 35.4 (n=2) (1 missing)" in text


def test_the_best_of_a_sweep_is_the_highest_mean_and_is_named(tmp_path):
    cfg = write_config(tmp_path, seeds=[0], methods={"kl-0.1": {"kl_beta": 0.1}, "kl-0.2": {"kl_beta": 0.2},
                                                     "noreg": {}})
    root = tmp_path / "results" / "micro"
    for method, value in (("kl-0.1", 0.4), ("kl-0.2", 0.7), ("noreg", 0.9)):
        _eval(root, method, 0, win_rate=value)
    spec = load_spec(_spec(tmp_path, title="T", metric="win_rate", experiment=str(cfg), columns={"m": {}},
                           rows={"KL": {"method": "kl-*"}}))
    table = build(spec)
    assert table.cells["KL", "m"].values == [0.7] and table.cells["KL", "m"].method == "kl-0.2"
    assert "KL / m: kl-0.2 of 2" in markdown(table)
    with pytest.raises(ConfigError, match="'resets-\\*' matches no method of experiment"):
        build(load_spec(_spec(tmp_path, title="T", metric="win_rate", experiment=str(cfg), columns={"m": {}},
                              rows={"R": {"method": "resets-*"}})))


def test_early_stopping_selects_on_training_prompts_and_reports_held_out(tmp_path):
    """GR Sec. 5.1 early-stops "based on the training winrate" and reports the test set: the step is chosen by the win
    rate on training prompts (eval/train_win_rate), the earliest among ties, and the held-out value at that step is
    reported, so the number reported is not the one that chose it."""
    assert select_checkpoint([0, 10, 20, 30, 40], [0.3, 0.6, 0.5, 0.6, 0.2]) == 10
    assert select_checkpoint([5], [0.1]) == 5
    cfg = write_config(tmp_path, seeds=[0, 1])
    # (step, train win rate, held-out win rate, KL): the held-out curve alone would pick steps 20 and 30
    curves = {0: [(0, 0.30, 0.30, 0.1), (10, 0.55, 0.50, 0.4), (20, 0.55, 0.58, 0.9), (30, 0.20, 0.20, 2.0)],
              1: [(0, 0.30, 0.30, 0.1), (10, 0.40, 0.40, 0.3), (20, 0.60, 0.45, 0.5), (30, 0.50, 0.62, 1.1)]}
    for seed, curve in curves.items():
        run = tmp_path / "results" / "micro" / "grpo" / "noreg" / f"seed{seed}"
        run.mkdir(parents=True)
        lines = [{"step": s, "eval/train_win_rate": t, "eval/win_rate": w, "eval/kl": k} for s, t, w, k in curve]
        lines.insert(1, {"step": 1, "proxy_reward": 0.3, "kl": 0.05})  # a training line: no eval/ keys
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    common = dict(title="T", experiment=str(cfg), selection="early_stopping", columns={"m": {}})
    wins = build(load_spec(_spec(tmp_path, metric="win_rate", rows={"No Reg": {"method": "noreg"}}, **common)))
    cell = wins.cells["No Reg", "m"]
    assert cell.steps == [10, 20] and cell.values == [0.50, 0.45]
    assert "Early stopping, selected steps per seed: No Reg / m: 10, 20" in markdown(wins)
    kl = build(load_spec(_spec(tmp_path, metric="kl", rows={"No Reg": {"method": "noreg"}}, **common)))
    assert kl.cells["No Reg", "m"].values == [0.4, 0.5]  # another metric, read at the steps the selection chose
    held_out = build(load_spec(_spec(tmp_path, metric="win_rate", select_on="win_rate",
                                     rows={"No Reg": {"method": "noreg"}}, **common)))
    assert held_out.cells["No Reg", "m"].steps == [20, 30]  # selecting on the reported prompts: optimistic


def test_replicas_pool_as_seeds_one_cell_can_differ_and_the_papers_spread_is_shown(tmp_path):
    """A cell over an experiment's replicas (the whole pipeline rerun: the papers' +- values) pools their seeds; a
    cell of its own (GR Table 2's 1.5B GR row is one named run); the paper's +- printed beside its mean."""
    methods = {"gr": {"gr_gamma": 0.03}, "gr-0.1": {"gr_gamma": 0.1}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_config(tmp_path / "a", seeds=[0], methods=methods)
    second = write_config(tmp_path / "b", experiment="micro-pipeline1", seed=1, seeds=[1], methods=methods)
    _eval(tmp_path / "a" / "results" / "micro", "gr-0.1", 0, win_rate=0.5)
    _eval(tmp_path / "b" / "results" / "micro-pipeline1", "gr-0.1", 1, win_rate=0.7)
    _eval(tmp_path / "a" / "results" / "micro", "gr", 0, win_rate=0.2)
    _eval(tmp_path / "b" / "results" / "micro-pipeline1", "gr", 1, win_rate=0.4)
    spec = load_spec(_spec(tmp_path, title="T", metric="win_rate", experiment=[str(first), str(second)],
                           columns={"pooled": {}, "other": {}}, rows={"GR": {"method": "gr-*"}},
                           cells={"GR | other": {"method": "gr"}}, paper={"GR": [20.96, None]},
                           paper_spread={"GR": [4.38, None]}))
    table = build(spec)
    assert table.cells["GR", "pooled"].values == [0.5, 0.7] and table.cells["GR", "other"].values == [0.2, 0.4]
    assert "| GR | 0.6 ± 0.1 (n=2) | 21.0 ± 4.4 | 0.3 ± 0.1 (n=2) | – |" in markdown(table)
    with pytest.raises(ConfigError, match="cells.GR | nope: not 'row | column'"):
        load_spec(_spec(tmp_path, title="T", metric="win_rate", experiment=str(first), columns={"c": {}},
                        rows={"GR": {"method": "gr"}}, cells={"GR | nope": {"method": "gr"}}))


def test_latex_is_escaped_and_balanced(tmp_path):
    assert latex_escape("a_b & 50% #1 {x} ~^\\") == \
        r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    cfg = write_config(tmp_path, seeds=[0, 1])
    for seed, value in ((0, 0.5), (1, 0.7)):
        _eval(tmp_path / "results" / "micro", "kl", seed, win_rate=value)
    spec = load_spec(_spec(tmp_path, title="Win rate (%) & KL_beta #1", metric="win_rate", experiment=str(cfg),
                           columns={"Pythia_1B & co": {}}, rows={"GRPO + KL_0.05 (50%)": {"method": "kl"}},
                           paper={"GRPO + KL_0.05 (50%)": [62.2]}))
    tex = latex(build(spec))
    body = re.sub(r"\\[{}%&#_$]", "", tex)  # escaped characters are not structure
    assert body.count("{") == body.count("}")
    assert re.findall(r"\\begin\{(\w+)\}", tex) == ["table", "tabular"] == re.findall(r"\\end\{(\w+)\}", tex)[::-1]
    assert r"Win rate (\%) \& KL\_beta \#1" in tex and r"GRPO + KL\_0.05 (50\%) & 0.6 $\pm$ 0.1 & 62.2 \\" in tex
    for line in tex.splitlines():  # every row has the header's number of cells
        if line.endswith(r"\\") and "multicolumn" not in line:
            assert len(re.split(r"(?<!\\)&", line)) == 3, line


def test_bad_specs_fail_with_one_line_naming_the_file_and_field(tmp_path):
    good = dict(title="T", metric="win_rate", experiment="config/micro.yaml", columns={"c": {}},
                rows={"r": {"method": "kl"}})
    for change, message in ((dict(colour="red"), "unknown field 'colour'"),
                            (dict(rows={"r": {"methd": "kl"}}), "rows.r: 'methd' is not a cell key"),
                            (dict(paper={"r": [1, 2]}), "paper.r: give one value per column"),
                            (dict(paper={"x": [1]}), "paper.x: not a row label"),
                            (dict(selection="best"), "selection 'best': final or early_stopping"),
                            (dict(metric=None, source="difficulty"), "has no bin")):
        fields = {k: v for k, v in {**good, **change}.items() if v is not None}
        path = _spec(tmp_path, **fields)
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            load_spec(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def _table_rules(edition: str) -> set[str]:
    specs = sorted(p.stem for p in (REPO / "config" / "tables" / edition).glob("*.yaml"))
    return {("figure_" if s.startswith("fig-") else "table_") + s.replace("-", "_") for s in specs}


def test_the_miniature_tables_dag_builds_from_a_clean_directory(tmp_path):
    """make tables-miniature's DAG (dry run): every miniature table and figure with the experiments it needs."""
    out = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "workflow" / "tables.smk"), "--directory", str(tmp_path), "-n",
                          "--cores", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    scheduled = jobs(out.stdout)
    assert {k for k in scheduled if k.startswith(("table_", "figure_"))} == _table_rules("miniature")
    assert {k.rsplit("_", 1)[0] for k in scheduled if k.endswith("_sft")} == {
        "miniature", "miniature_small", "miniature_data3", "miniature_small_data3", "rlvr_miniature", "miniature_ood",
        "rlvr_ood"}


def test_every_paper_table_dry_runs_through_the_slurm_profile(tmp_path):
    """One DAG over every experiment the paper tables name (modules of the pipeline's Snakefile), each table's rule
    waiting for its cells' files, through the cluster profile."""
    out = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "workflow" / "tables.smk"), "--directory", str(tmp_path), "-n",
                          "--profile", str(REPO / "profiles" / "slurm"), "--config", "tables=config/tables/paper"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    scheduled = jobs(out.stdout)
    assert {k for k in scheduled if k.startswith(("table_", "figure_"))} == _table_rules("paper")
    # only what the tables read: GR Table 1's kl / resets / gr grids and the figure's noreg; Tables 8-11's Dr.GRPO and
    # q sweep (not the Table-1 baselines the data-amount configs inherit)
    assert scheduled["gr_tldr_pythia_1b_grpo"] == 1 + 6 + 5 + 3  # one seed: the paper's
    assert scheduled["signcert_tldr_pythia_1b_data5_grpo"] == 7
    assert scheduled["gr_tldr_pythia_1b_dpo"] == 2 and scheduled["gr_math_qwen2_5_1_5b_report"] == 1


def test_difficulty_cells_read_the_reports_bins_and_tell_an_empty_bin_from_a_missing_one(tmp_path):
    cfg = write_config(tmp_path, "rlvr-micro.yaml")
    report = tmp_path / "results" / "rlvr-micro" / "report"
    report.mkdir(parents=True)
    (report / "difficulty.csv").write_text("method,bin,groups,questions,seeds,0,10\n"
                                           "gr,0-20,4,40,3,0.125,0.25\ngr,40-60,0,0,3,,\n")
    spec = load_spec(_spec(tmp_path, title="T", source="difficulty", scale=100, experiment=str(cfg), method="gr",
                           columns={"step 0": {"step": 0}, "step 10": {"step": 10}},
                           rows={"0-20": {"bin": "0-20"}, "40-60": {"bin": "40-60"}, "60-80": {"bin": "60-80"}}))
    table = build(spec)
    assert table.cells["0-20", "step 10"].values == [25.0] and table.cells["0-20", "step 10"].n == 3
    assert table.cells["40-60", "step 0"].empty and not table.cells["40-60", "step 0"].missing
    assert table.cells["60-80", "step 0"].missing  # a bin the report does not have
    assert "| 0-20 | 12.5 (n=3) | – | 25.0 (n=3) | – |" in markdown(table)


def test_a_method_family_keeps_its_colour_and_a_variant_gets_a_stable_shade_of_it():
    from rlhf.figures import FAMILY_COLOURS, method_colour
    assert method_colour("kl") == FAMILY_COLOURS["kl"] and method_colour("noreg") == FAMILY_COLOURS["noreg"]
    assert method_colour("elastic_reset") == FAMILY_COLOURS["elastic"]
    shades = {method_colour(m) for m in ("kl-0.03", "kl-0.05", "kl-0.07")}
    assert FAMILY_COLOURS["kl"] not in shades and method_colour("kl-0.05") == method_colour("kl-0.05")
    assert method_colour("unheard-of") == method_colour("unheard-of")


def test_figures_plot_every_seed_and_say_what_is_missing(tmp_path):
    """A curve figure from crafted metrics logs (one panel complete, one whose runs are absent) and a bars figure from
    a bench.json: PNGs with content, the missing runs named."""
    import numpy as np
    from matplotlib.image import imread

    from rlhf.figures import load_figure, render
    for name in ("done", "empty"):
        (tmp_path / name).mkdir()
    done, empty = (write_config(tmp_path / name, seeds=[0, 1]) for name in ("done", "empty"))
    for seed in (0, 1):
        run = tmp_path / "done" / "results" / "micro" / "grpo" / "kl" / f"seed{seed}"
        run.mkdir(parents=True)
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "eval/kl": s / 10,
                                                                       "eval/win_rate": 0.5 + seed * s / 100})
                                                           for s in (0, 5, 10)) + "\n")
    curve = load_figure(_spec(tmp_path, "curve", figure="curve", title="T", x="eval/kl", y="eval/win_rate",
                              methods=["kl"], panels={"done": {"experiment": str(done)},
                                                      "empty": {"experiment": str(empty)}}))
    png, missing = render(curve, tmp_path / "out")
    assert len(missing) == 2 and all("empty/results/micro/grpo/kl" in m for m in missing)
    image = imread(png)
    assert image.shape[1] > image.shape[0] and np.std(image[..., :3]) > 0.05  # two panels, not blank
    bench = tmp_path / "done" / "results" / "micro" / "bench"
    bench.mkdir(parents=True)
    bench.joinpath("bench.json").write_text(json.dumps({"results": {"noreg": {"step": 0.4}, "gr": {"step": 0.7}}}))
    bars = load_figure(_spec(tmp_path, "bars", figure="bars", title="T", metric="step", methods=["noreg", "gr", "uwo"],
                             panels={"cpu": {"experiment": str(done)}}))
    png, missing = render(bars, tmp_path / "out")
    assert png.name == "bars.png" and len(missing) == 1 and "no method 'uwo'" in missing[0]
    with pytest.raises(ConfigError, match="figure curve needs y"):
        load_figure(_spec(tmp_path, "bad", figure="curve", x="eval/kl", methods=["kl"],
                          panels={"p": {"experiment": str(done)}}))


def test_the_tables_command_renders_what_exists_and_fails_in_one_line(tmp_path, capsys):
    from rlhf.tables import main
    cfg = write_config(tmp_path)
    _eval(tmp_path / "results" / "micro", "sft", 0, win_rate=0.4)
    spec = _spec(tmp_path, "one", title="T", metric="win_rate", experiment=str(cfg), columns={"c": {}},
                 rows={"SFT": {"method": "sft"}, "KL": {"method": "kl"}})
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 0
    assert "tables: one: 1/2 cells complete" in capsys.readouterr().out
    assert {p.suffix for p in (tmp_path / "out").iterdir()} == {".md", ".csv", ".tex", ".html"}
    assert main([str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tables: error:") and "nowhere.yaml: no such table spec" in err and "\n" not in err


def test_experiments_in_one_snakemake_process_keep_their_own_side_settings(tmp_path, monkeypatch):
    """workflow/tables.smk parses one Snakefile module per experiment in one process, and every module sets
    $RLHF_SIDE_SETTINGS: each experiment's entry is kept under its results folder and a stage takes the entry its
    outputs live under (the RLVR miniature's stand-in judge prices once reached another experiment's jobs)."""
    from rlhf.cli import add_side_settings, side_settings_for
    from rlhf.config import ConfigError
    monkeypatch.chdir(tmp_path)
    value = add_side_settings(None, "results/rlvr-miniature", {"gold": {"judge": {"prices": {"standin-judge": 0}}}})
    value = add_side_settings(value, "results/miniature", {"wandb": {"enabled": False}})
    assert side_settings_for(value, ["results/rlvr-miniature/grpo/gr/seed0/policy"])["gold"]["judge"]["prices"] == {
        "standin-judge": 0}
    assert side_settings_for(value, [str(tmp_path / "results" / "miniature" / "sft")]) == {"wandb": {"enabled": False}}
    with pytest.raises(ConfigError, match="no experiment whose results folder holds results/miniature-small/sft"):
        side_settings_for(value, ["results/miniature-small/sft"])   # a prefix of the name is not the folder
    assert add_side_settings('{"gold": {}}', "results/x", {}) == add_side_settings(None, "results/x", {})
