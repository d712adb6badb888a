"""The papers' figures from figure specs (a spec with `figure:` beside the table specs in config/tables/), and the one
colour per method family that every plot of the project uses.

  figure   curve: y against x from each run's training-time evaluations (one line per seed), one panel per entry of
           `panels` | bars: a value per method from make bench (SignCert Table 2's seconds per step)
  title, panels (label -> {experiment: config}), methods (names or patterns, as in table specs), x, y (curve; keys of
  the GRPO metrics log, e.g. eval/kl, eval/win_rate, onpolicy/rm_accuracy, sharpness), metric (bars), xlabel, ylabel

A panel whose runs are missing says so inside the panel and in the command's output; the PNG is still written.
Writes <out>/<spec name>.png.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf.errors import ConfigError
from rlhf.results import cell_files, experiment_config, methods_of, read_method

# One colour per method family (a sweep's points and variants share their family's: kl-0.05 -> kl, bspo-strict ->
# bspo), the same in every report and figure; unknown families get the remaining colours by name.
FAMILY_COLOURS = {"sft": "#7f7f7f", "noreg": "#d62728", "drgrpo": "#d62728", "kl": "#1f77b4", "resets": "#2ca02c",
                  "gr": "#9467bd", "signcert": "#ff7f0e", "elastic": "#17becf", "elastic_reset": "#17becf",
                  "uwo": "#8c564b", "advpo": "#e377c2",
                  "bspo": "#bcbd22", "dpo": "#393b79", "tr": "#637939", "scheduled": "#843c39"}
_SPARE = ["#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194", "#6b6ecf", "#b5cf6b", "#e7ba52"]


def method_colour(method: str) -> str:
    """The family's colour; a variant (kl-0.05, bspo-strict) gets a shade of it, fixed by its name."""
    from matplotlib.colors import to_hex, to_rgb  # heavy: only a figure needs matplotlib
    family = str(method).split("-")[0]
    base = FAMILY_COLOURS.get(family) or _SPARE[sum(map(ord, family)) % len(_SPARE)]
    if method == family:
        return base
    t = (sum(map(ord, str(method))) % 7 - 3) / 6  # -0.5 .. 0.5: darker or lighter
    return to_hex([c + (1 - c) * t if t > 0 else c * (1 + t) for c in to_rgb(base)])


@dataclass(frozen=True)
class FigureSpec:
    path: Path
    kind: str
    title: str
    panels: dict[str, dict]
    methods: list
    fields: dict

    @property
    def name(self) -> str:
        return self.path.stem

    def cell(self, panel: str) -> dict:
        """A panel as a table cell of rlhf.tables (for its files and methods)."""
        return {"source": "bench" if self.kind == "bars" else "training", "selection": "final", "reduce": "mean",
                "scale": 1, "decimals": 3, "metric": self.fields.get("y") or self.fields.get("metric"),
                "method": self.methods, **self.panels[panel]}

    def experiments(self) -> list[Path]:
        return list(dict.fromkeys(Path(p["experiment"]) for p in self.panels.values()))


def is_figure(path: str | Path) -> bool:
    raw = yaml.safe_load(Path(path).read_text())
    return isinstance(raw, dict) and "figure" in raw


def load_figure(path: str | Path) -> FigureSpec:
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    kind = raw.get("figure")
    need = {"curve": ("x", "y"), "bars": ("metric",)}.get(kind)
    if need is None:
        raise ConfigError(f"{path}: figure {kind!r}: curve or bars")
    allowed = {"figure", "title", "panels", "methods", "x", "y", "metric", "xlabel", "ylabel"}
    if unknown := sorted(set(raw) - allowed):
        raise ConfigError(f"{path}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for key in (*need, "panels", "methods"):
        if not raw.get(key):
            raise ConfigError(f"{path}: figure {kind} needs {key}")
    panels = raw["panels"]
    if not isinstance(panels, dict) or not all(isinstance(p, dict) and "experiment" in p for p in panels.values()):
        raise ConfigError(f"{path}: panels must map labels to {{experiment: <config>}}")
    methods = raw["methods"] if isinstance(raw["methods"], list) else [raw["methods"]]
    return FigureSpec(path, kind, str(raw.get("title", path.stem)), {str(k): v for k, v in panels.items()}, methods,
                      {k: raw[k] for k in ("x", "y", "metric", "xlabel", "ylabel") if k in raw})


def render(spec: FigureSpec, out: Path) -> tuple[Path, list[str]]:
    """The PNG and what was missing."""
    import matplotlib  # heavy: only a figure needs it (tables.smk imports this module to list figures)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    missing: list[str] = []
    fig, axes = plt.subplots(1, len(spec.panels), figsize=(4.8 * len(spec.panels), 3.8), squeeze=False)
    for ax, (label, panel) in zip(axes[0], spec.panels.items()):
        cfg = experiment_config(Path(panel["experiment"]))
        cell = spec.cell(label)
        # bars name make bench's rows as they are; curves the experiment's methods (patterns allowed)
        methods = spec.methods if spec.kind == "bars" else [m for m in methods_of(cell, cfg) if m != "sft"]
        gaps = []
        if spec.kind == "bars":
            values = {m: read_method({**cell, "method": m}, cfg) for m in methods}
            gaps = [f for v in values.values() for f in v.missing]
            shown = [m for m in methods if values[m].values]
            ax.bar(shown, [values[m].values[0] for m in shown], color=[method_colour(m) for m in shown])
            ax.set(ylabel=spec.fields.get("ylabel", spec.fields["metric"]))
            ax.tick_params(axis="x", rotation=45)
        else:
            x, y = spec.fields["x"], spec.fields["y"]
            for method in methods:
                for n, (_, path) in enumerate(cell_files({**cell, "method": method}, cfg)):
                    if not path.is_file():
                        gaps.append(str(path))
                        continue
                    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                    points = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", alpha=0.8,
                            color=method_colour(method), label=method if n == 0 else None)
            ax.set(xlabel=spec.fields.get("xlabel", x), ylabel=spec.fields.get("ylabel", y))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if gaps:
            missing += gaps
            ax.text(0.5, 0.5, f"missing: {len(gaps)} run(s)", transform=ax.transAxes, ha="center", color="red")
        ax.set_title(label)
    fig.suptitle(spec.title)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{spec.name}.png"
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)  # never a half-written figure under the final name
    return png, missing
