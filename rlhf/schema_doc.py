"""docs/configuration.md, generated from the config schema (workflow/schemas/config.schema.yaml), so the reference
cannot drift from what validation accepts: `python -m rlhf.schema_doc > docs/configuration.md` (`make docs`);
tests/test_config.py fails while the committed page differs from this output.
"""
from __future__ import annotations

import json

import yaml

from rlhf.config import SCHEMA_PATH

HEADER = """# Configuration reference

Generated from `workflow/schemas/config.schema.yaml` by `python -m rlhf.schema_doc` (`make docs`); do not edit by
hand. Every config is validated against that schema on load: an unknown key, a wrong type or a missing field stops
with one line naming it. How configs combine (`extends`, `methods`, `sweeps`, `--config` overrides):
[pipeline.md](pipeline.md#configuration).
"""


def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    if not ref:
        return node
    for part in ref.lstrip("#/").split("/"):
        root = root[part]
    return root


def _type(node: dict) -> str:
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"])
    t = node.get("type", "")
    return " | ".join(t) if isinstance(t, list) else t


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(props: dict, root: dict, prefix: str) -> list[tuple[str, dict]]:
    """(dotted name, node) for every field, sub-objects with declared fields expanded after their own row."""
    out = []
    for name, node in props.items():
        target = _resolve(node, root)
        out.append((prefix + name, {**target, **{k: v for k, v in node.items() if k != "$ref"}}))
        if "properties" in target and name not in ("judge",):  # gold.judge: its own section below
            out += _rows(target["properties"], root, f"{prefix}{name}.")
    return out


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, node in rows:
        default = "" if "default" not in node or isinstance(node["default"], dict) and node["default"] == {} \
            else f"`{_cell(json.dumps(node['default']))}`"
        lines.append(f"| `{name}` | {_cell(_type(node))} | {default} | {_cell(node.get('description', ''))} |")
    return lines


def render() -> str:
    root = yaml.safe_load(SCHEMA_PATH.read_text())
    out = [HEADER]
    top = {k: v for k, v in root["properties"].items()}
    simple = [(k, v) for k, v in top.items() if "properties" not in _resolve(v, root)]
    out += ["## Top level", "", *_table(simple), ""]
    for name, node in top.items():
        target = _resolve(node, root)
        if "properties" not in target:
            continue
        out += [f"## `{name}`", ""]
        if node.get("description") or target.get("description"):
            out += [_cell(node.get("description") or target["description"]), ""]
        if name == "grpo":
            out += ["Every field can be overridden per method (`methods: {name: {field: value}}`) and swept "
                    "(`sweeps`).", ""]
        out += [*_table(_rows(target["properties"], root, f"{name}.")), ""]
    judge = root["$defs"]["judge"]
    out += ["## `gold.judge`", "", _cell(judge.get("description", "The API judge's client.")), "",
            *_table(_rows(judge["properties"], root, "gold.judge.")), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
