"""Load, override and validate experiment configs against workflow/schemas/config.schema.yaml.

The schema is the single source of field names, types, defaults and help text; both the CLI and the
Snakefile go through `validate_config`, so a typo fails the same way everywhere.
"""
from __future__ import annotations

import copy
import functools
import itertools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from rlhf.cluster import ranks, ranks_text
from rlhf.errors import ConfigError
from rlhf.data.rlvr import TASK_OF_SOURCE
from rlhf.registry import SFT_BASELINE, SIDE_SETTINGS, STAGES, drop, pick
from rlhf.rewards.kinds import RLVR_DEFAULT
from rlhf.rewards.kinds import check as check_reward
from rlhf.settings import GRPOSettings

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float, as YAML 1.2 does (PyYAML's YAML 1.1 wants 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The parsed schema (~60 ms to read), once per process: every rule's params call trigger_view. Read-only."""
    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    rules = [name for name, stage in STAGES.items() if not stage.tool]  # the one list of stages
    schema["properties"]["resources"]["properties"]["jobs"]["propertyNames"] = {"enum": ["default", *rules]}
    return schema


def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        for part in ref.lstrip("#/").split("/"):
            root = root[part]
        return root
    return node


def _fill_defaults(cfg: dict, node: dict, root: dict) -> None:
    """Insert schema defaults for missing keys, recursing through declared properties only.

    jsonschema does not fill defaults itself. Method overrides (`methods.*`) are deliberately not filled:
    a method only overrides what it names, the rest comes from the `grpo` section.
    """
    node = _resolve(node, root)
    for key, sub in node.get("properties", {}).items():
        if key not in cfg and "default" in sub:  # a default beside a $ref belongs to the referring field
            cfg[key] = copy.deepcopy(sub["default"])
        sub = _resolve(sub, root)
        if key not in cfg and "default" in sub:
            cfg[key] = copy.deepcopy(sub["default"])
        if isinstance(cfg.get(key), dict) and "properties" in _resolve(sub, root):
            _fill_defaults(cfg[key], sub, root)


def _field(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


def _raise_first(errors: list, source: str) -> None:
    if not errors:
        return
    e = jsonschema.exceptions.best_match(errors)
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        allowed = ", ".join(sorted(e.schema.get("properties", {})))
        prefix = _field(e)
        names = ", ".join(f"{prefix}.{k}" if prefix != "<top level>" else k for k in extra)
        raise ConfigError(f"{source}: unknown key {names} (allowed here: {allowed})")
    if e.validator == "oneOf" and _field(e) == "model":
        raise ConfigError(f"{source}: model: set exactly one of model.name (a hub id or folder) or model.build (a tiny model)")
    raise ConfigError(f"{source}: {_field(e)}: {e.message}")


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Validate in place (filling defaults) and return the config; raise ConfigError naming the field."""
    schema = _schema()
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(cfg).__name__}")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(list(e.absolute_path)), str(e.message)))
    if not errors:
        _default_reward(cfg)
        _fill_defaults(cfg, schema, schema)
        for entry in cfg.get("dpo", {}).get("methods", {}).values():  # each DPO method's own fields
            _fill_defaults(entry, schema["properties"]["dpo"]["properties"]["methods"]["additionalProperties"], schema)
        if cfg["data"]["source"] == "arithmetic":  # a section without a default: filled where it is used
            data = schema["properties"]["data"]["properties"]
            _fill_defaults(cfg["data"].setdefault("arithmetic", {}), data["arithmetic"], schema)
        errors = list(validator.iter_errors(cfg))
    _raise_first(errors, source)
    expand_sweeps(cfg, source)
    _raise_first(list(validator.iter_errors(cfg)), source)  # a grid value of the wrong type names its method
    _check_semantics(cfg, source)
    return cfg


def _check_dpo(cfg: dict, source: str) -> None:
    """DPO methods share the method namespace (evaluate and report go by name) and need preference pairs."""
    names = set(cfg.get("dpo", {}).get("methods", {}))
    if not names:
        return
    if clash := sorted(names & (set(cfg["methods"]) | {SFT_BASELINE})):
        raise ConfigError(f"{source}: dpo.methods.{clash[0]}: the name is taken (by methods or the SFT baseline); "
                          "method names must be unique")
    if "rlvr" in cfg:
        raise ConfigError(f"{source}: the dpo section needs preference pairs; an RLVR experiment has none")


def _check_rlvr(cfg: dict, source: str) -> None:
    data, rlvr = cfg["data"]["source"], "rlvr" in cfg
    if (data in TASK_OF_SOURCE) != rlvr:
        raise ConfigError(f"{source}: " + (f"data.source {data} is an RLVR task: add an rlvr section (rlvr: {{}} for "
                                           "the defaults)" if not rlvr else
                                           f"the rlvr section needs an RLVR data.source ({', '.join(TASK_OF_SOURCE)}), "
                                           f"not {data}"))
    if not rlvr:
        return
    if data in ("gsm8k", "math") and "hub_name" not in cfg["data"]:
        raise ConfigError(f"{source}: data.hub_name is required when data.source is '{data}' (e.g. openai/gsm8k)")
    if data == "arithmetic" and "build" not in cfg["model"]:
        raise ConfigError(f"{source}: the arithmetic task needs model.build (its vocabulary is the task's own)")
    judge = cfg["gold"]["judge"]
    if cfg["rlvr"]["reward"] == "judge" and not cfg["rlvr"]["judge"]["standin"] and judge["max_tokens"] < 64:
        raise ConfigError(f"{source}: gold.judge.max_tokens {judge['max_tokens']} cannot hold the RLVR judge's reply "
                          "(a judgement, then the scores): set it to e.g. 512")


def _check_semantics(cfg: dict, source: str) -> None:
    if cfg["data"]["source"] == "jsonl":
        for key in ("train_file", "test_file"):
            if key not in cfg["data"]:
                raise ConfigError(f"{source}: data.{key} is required when data.source is 'jsonl'")
    if cfg["data"]["source"] in ("tldr", "alpaca_farm") and "hub_name" not in cfg["data"]:
        raise ConfigError(f"{source}: data.hub_name is required when data.source is '{cfg['data']['source']}'")
    if cfg["data"]["source"] == "alpaca_farm" and ("name" not in cfg["model"] or not cfg["data"]["num_test"]):
        raise ConfigError(f"{source}: data.source alpaca_farm needs model.name (its tokenizer filters by length) "
                          "and a data.num_test")
    _check_rlvr(cfg, source)
    _check_dpo(cfg, source)
    if cfg["gold"]["type"] == "reward_model" and "name" not in cfg["gold"]:
        raise ConfigError(f"{source}: gold.name is required when gold.type is 'reward_model'")
    if SFT_BASELINE in cfg["methods"]:
        raise ConfigError(f"{source}: methods.{SFT_BASELINE}: '{SFT_BASELINE}' names the SFT-policy baseline; "
                          "choose another method name")
    for method in cfg["methods"]:
        m = GRPOSettings.for_method(cfg, method)
        check_reward(cfg, source, method, m)  # the reward kind's own conditions (rlhf/rewards/kinds.py)
        if m.reset_every and not m.kl_beta:
            raise ConfigError(f"{source}: methods.{method}: reset_every needs kl_beta > 0 (resets act on the KL reference)")
        if m.reset_every and m.kl_beta_decay_every:
            raise ConfigError(f"{source}: methods.{method}: reset_every and kl_beta_decay_every are alternatives; set one")
        if m.gr_refresh_master_weights and m.gr_estimator != "finite_difference":
            raise ConfigError(f"{source}: methods.{method}: gr_refresh_master_weights reproduces the authors' finite "
                              "difference (a refresh around the perturbation); gr_estimator hvp perturbs nothing")
        world = ranks(cfg, "grpo")
        if world > 1 and m.prompts_per_step % world:
            raise ConfigError(f"{source}: methods.{method}: prompts_per_step = {m.prompts_per_step} does not split "
                              f"over the {ranks_text(cfg, 'grpo')} of resources.jobs.grpo (one rank per GPU)")
    for stage in ("sft", "rm"):
        world = ranks(cfg, stage)
        if world > 1 and cfg[stage]["batch_size"] % world:
            raise ConfigError(f"{source}: {stage}.batch_size = {cfg[stage]['batch_size']} (the global batch) does not "
                              f"split over the {ranks_text(cfg, stage)} of resources.jobs.{stage}")
    for rule, spec in cfg["resources"]["jobs"].items():
        if spec.get("nodes", 1) > 1 and (rule == "default" or not STAGES[rule].data_parallel):
            raise ConfigError(f"{source}: resources.jobs.{rule}.nodes = {spec['nodes']}: only the data-parallel stages "
                              f"({', '.join(n for n, s in STAGES.items() if s.data_parallel)}) run on several nodes")
    _check_mechanisms(cfg, source)
    if cfg["data"]["source"] == "miniature" and not (cfg["data"]["num_train"] and cfg["data"]["num_test"]):
        raise ConfigError(f"{source}: the miniature generates data.num_train and data.num_test examples; set both")
    if cfg["data"]["source"] == "miniature" and "build" not in cfg["model"]:
        raise ConfigError(f"{source}: the miniature task needs model.build (its vocabulary is the task's own)")


def _check_mechanisms(cfg: dict, source: str) -> None:
    method = cfg["mechanisms"]["method"]
    if method is None:
        return
    if "rlvr" in cfg:
        raise ConfigError(f"{source}: mechanisms.method: the diagnostics compare proxy-RM signals; an RLVR experiment "
                          "has no proxy RM (set mechanisms.method: null)")
    if method not in cfg["methods"]:
        raise ConfigError(f"{source}: mechanisms.method: {method!r} is not a method of the config (have: "
                          f"{', '.join(cfg['methods'])})")
    if not GRPOSettings.for_method(cfg, method).rollouts_every:
        raise ConfigError(f"{source}: mechanisms.method: {method} keeps no rollouts; set grpo.rollouts_every "
                          f"(or methods.{method}.rollouts_every) to k > 0")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, value = text.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    return key.split("."), yaml_load(value) if value else ""


def _merge(node: dict, key: str, value: Any) -> None:
    """A mapping merges into an existing section (grpo={steps: 5} keeps the other grpo fields)."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge(node[key], k, v)
    else:
        node[key] = value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {k} is not a section")
        _merge(node, keys[-1], value)
    return cfg


def _retype(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _retype(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_retype(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value
    return value


CONFIG_ROOT = SCHEMA_PATH.parents[2] / "config"  # the project's config folder


def _extended(parent, child: str, chain: tuple, folder: Path | None) -> dict:
    """The config `child` extends: `parent` relative to the child's folder, else to the project's config folder."""
    if not isinstance(parent, str):
        raise ConfigError(f"{child}: extends: expected a file name, got {parent!r}")
    candidates = ([folder / parent] if folder is not None else []) + [CONFIG_ROOT / parent]
    path = next((c for c in candidates if c.is_file()), candidates[0])
    return _read_yaml(path, chain)


def _merge_onto(parent: dict, child: dict) -> dict:
    for key, value in child.items():
        _merge(parent, key, value)
    return parent


def _read_yaml(path: Path, chain: tuple = ()) -> dict:
    """A config file with its `extends` chain merged in (the child's mappings merge into the parent's)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, chain))}")
    try:
        cfg = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    parent = cfg.pop("extends", None)
    if parent is None:
        return cfg
    return _merge_onto(_extended(parent, str(path), (*chain, path.resolve()), path.parent), cfg)


def config_from_mapping(raw: dict, source: str = "snakemake config") -> dict:
    """Snakemake's `config` (its merge of --configfile and --config) as a validated config. Snakemake's YAML 1.1
    reading leaves 1e-4 a string and cannot know where the file was, so numbers are re-typed and `extends` is
    resolved against the project's config folder."""
    cfg = _retype(copy.deepcopy(dict(raw)))
    parent = cfg.pop("extends", None)
    if parent is not None:
        cfg = _merge_onto(_extended(parent, source, (), None), cfg)
    return validate_config(cfg, source=source)


def sweep_points(cfg: dict) -> dict[str, dict[str, dict]]:
    """sweep name -> {method <sweep>-<v1>[-<v2>...]: its fields}, in grid order."""
    out = {}
    for name, sweep in cfg.get("sweeps", {}).items():
        fields = list(sweep["grid"])
        out[name] = {"-".join([name, *(f"{v:g}" if isinstance(v, float) else str(v) for v in point)]):
                     {**sweep.get("base", {}), **dict(zip(fields, point))}
                     for point in itertools.product(*(sweep["grid"][f] for f in fields))}
    return out


def expand_sweeps(cfg: dict, source: str = "config") -> dict:
    """Each sweep point becomes a method; the DAG then runs it like any other."""
    for name, points in sweep_points(cfg).items():
        for method, overrides in points.items():
            if cfg["methods"].get(method, overrides) != overrides:
                raise ConfigError(f"{source}: sweeps.{name} makes method {method!r}, which methods already names")
            cfg["methods"][method] = overrides
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    cfg = apply_overrides(_read_yaml(path), overrides or [])
    return validate_config(cfg, source=str(path))


# --- rerun triggers without default values ---------------------------------------------------------------------------
# A rule's rerun trigger (Snakemake params) is its settings view *without the fields at their schema default*; the
# stage gets the same text and fills the defaults back in (`complete_view`). So a release that adds a setting whose
# default keeps the old behaviour (a new regularizer's strength, 0 = off) reruns nothing, while setting any field to
# another value, or back to its default, changes the trigger. (The price: changing an existing field's default in the
# schema would not rerun results made under the old one; the project does not do that — a changed behaviour gets a
# new field.) Empty sections stay in the trigger, so a declared section always reaches the stage.


def _schema_node(path: list[str], root: dict) -> dict | None:
    node = root
    for key in path:
        node = _resolve(node, root).get("properties", {}).get(key)
        if node is None:
            return None
    return node


def _default_of(node: dict, root: dict):
    """A field's schema default (a default beside a $ref belongs to the referring field), or _NO_DEFAULT."""
    if "default" in node:
        return node["default"]
    return _resolve(node, root).get("default", _NO_DEFAULT)


_NO_DEFAULT = object()


def _default_reward(cfg: dict) -> None:
    """grpo.reward's default in an RLVR experiment (one with an rlvr section): its verifiable reward; elsewhere the
    schema's (proxy)."""
    if "rlvr" in cfg and isinstance(cfg.get("grpo", {}), dict):
        cfg.setdefault("grpo", {}).setdefault("reward", RLVR_DEFAULT)


def trigger_view(view: dict) -> dict:
    """`view` without the leaves equal to their schema default (declared sub-objects are recursed into and kept)."""
    root = _schema()

    def strip(d: dict, path: list[str]) -> dict:
        out = {}
        for key, value in d.items():
            node = _schema_node([*path, key], root)
            declared = node is not None and "properties" in _resolve(node, root)
            if isinstance(value, dict) and declared:
                out[key] = strip(value, [*path, key])
            elif node is None or _default_of(node, root) != value:  # _NO_DEFAULT differs from every value
                out[key] = value
        return out
    out = strip(view, [])
    if "rlvr" in out and out.get("grpo", {}).get("reward") == RLVR_DEFAULT:  # that experiment's default, too
        del out["grpo"]["reward"]
    return out


def complete_view(trigger: dict, stage: str) -> dict:
    """The stage's full view from its trigger: the schema defaults filled back in, then only its declared fields."""
    root = _schema()
    filled = copy.deepcopy(trigger)
    if "grpo" in filled:
        _default_reward(filled)
    _fill_defaults(filled, root, root)
    view = pick(filled, STAGES[stage].settings)
    drop(view, SIDE_SETTINGS)  # they come from the environment (SIDE_ENV), as for every stage
    return view
