import pytest
import yaml

import dataclasses

from rlhf.config import _schema, apply_overrides, config_from_mapping, load_config
from rlhf.errors import ConfigError
from rlhf.settings import SECTIONS, GRPOSettings
from tests.conftest import REPO


def _write(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _mini():
    return yaml.safe_load((REPO / "config" / "miniature.yaml").read_text())


EXPERIMENTS = sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "claims.yaml")  # claims: not one


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "config" / name)
    assert cfg["grpo"]["clip_eps"] == 0.2  # a default filled from the schema


def test_unknown_key_names_the_field(tmp_path):
    cfg = _mini()
    cfg["grpo"]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError, match=r"unknown key grpo\.learning_rate"):
        load_config(_write(tmp_path, cfg))


def test_unknown_key_in_a_method(tmp_path):
    cfg = _mini()
    cfg["methods"]["kl"] = {"beta": 0.1}
    with pytest.raises(ConfigError, match=r"methods\.kl\.beta"):
        load_config(_write(tmp_path, cfg))


def test_wrong_type_names_the_field(tmp_path):
    cfg = _mini()
    cfg["grpo"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"grpo\.steps: 'many' is not of type 'integer'"):
        load_config(_write(tmp_path, cfg))


def test_missing_required_field(tmp_path):
    cfg = _mini()
    del cfg["data"]
    with pytest.raises(ConfigError, match="'data' is a required property"):
        load_config(_write(tmp_path, cfg))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_model_needs_exactly_one_of_name_or_build(tmp_path):
    cfg = _mini()
    cfg["model"]["name"] = "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ConfigError, match="exactly one of model.name"):
        load_config(_write(tmp_path, cfg))


def test_overrides_are_typed_and_merge_sections(tmp_path):
    cfg = load_config(REPO / "config" / "miniature.yaml", ["grpo.lr=1e-4", "grpo={steps: 7}", "seeds=[5]"])
    assert cfg["grpo"]["lr"] == 1e-4 and cfg["grpo"]["steps"] == 7 and cfg["grpo"]["group_size"] == 8
    assert cfg["seeds"] == [5]
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["grpo.lr"])


def test_snakemakes_config_mapping_is_retyped_and_extends_the_project_config():
    """Snakemake's YAML 1.1 reading leaves 1e-4 and nested scalars of --config as strings; `extends` resolves
    against the project's config folder (Snakemake does not say where the file was)."""
    cfg = config_from_mapping({"extends": "micro.yaml", "grpo": {"steps": "5", "lr": "1e-4"}, "experiment": "x"})
    assert cfg["grpo"]["steps"] == 5 and cfg["grpo"]["lr"] == 1e-4 and cfg["experiment"] == "x"
    assert cfg["grpo"]["group_size"] == 4  # from config/micro.yaml
    paper = config_from_mapping({"extends": "paper/gr-tldr-pythia-1b.yaml"})
    assert paper == load_config(REPO / "config" / "paper" / "gr-tldr-pythia-1b.yaml")


def test_method_overrides_only_what_it_names():
    cfg = load_config(REPO / "config" / "miniature.yaml")
    s = GRPOSettings.for_method(cfg, "kl")
    assert s.kl_beta == 0.1 and s.lr == cfg["grpo"]["lr"]
    assert GRPOSettings.for_method(cfg, "noreg").kl_beta == 0.0
    with pytest.raises(ConfigError, match="method 'ppo' is not in config.methods"):
        GRPOSettings.for_method(cfg, "ppo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kl_beta = 0.2


def test_typed_settings_fields_are_the_schemas():
    """Each stage's typed settings and its schema section (documentation, defaults, validation) name the same
    fields, and every section's dataclass builds from the miniature's validated config."""
    schema = _schema()
    sections = {cls.SECTION: schema["properties"][cls.SECTION]["properties"] for cls in SECTIONS}
    sections["grpo"] = schema["$defs"]["grpo"]["properties"]
    cfg = load_config(REPO / "config" / "miniature-baselines.yaml")  # every section
    for cls in (*SECTIONS, GRPOSettings):
        assert {f.name for f in dataclasses.fields(cls)} == set(sections[cls.SECTION]), cls.__name__
        given = {k: v for k, v in cls.of(cfg).as_dict().items() if k in cfg[cls.SECTION] or v is not None}
        assert given == cfg[cls.SECTION]  # model.name / model.build: None where the section leaves them out


def test_sections_behind_a_ref_get_their_defaults(tmp_path):
    """grpo and gold.judge are declared by $ref with a default beside it: omitted, they are still filled."""
    cfg = yaml.safe_load((REPO / "config" / "micro.yaml").read_text())
    del cfg["grpo"]
    cfg["gold"] = {"type": "openai"}
    cfg["results_dir"] = str(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded["grpo"]["steps"] == 1000 and loaded["grpo"]["group_size"] == 8
    assert loaded["gold"]["judge"]["model"] == "gpt-4.1-nano"
    assert loaded["gold"]["judge"]["prices"]["gpt-4.1-nano"] == {"input": 0.10, "output": 0.40}


def _write_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_extends_merges_sections_and_sweeps_expand_into_methods(tmp_path):
    micro = (REPO / "config" / "micro.yaml").read_text()
    _write_text(tmp_path, "parent.yaml", micro.replace("results_dir", "x") + f"\nresults_dir: {tmp_path}\n")
    child = _write_text(tmp_path, "child.yaml", """
extends: parent.yaml
experiment: child
grpo: {steps: 7}
methods: {noreg: {}}
sweeps:
  kl: {grid: {kl_beta: [0.05, 0.1]}}
  rs: {base: {reset_every: 3}, grid: {kl_beta: [0.2], lr: [1.0e-4, 3.0e-4]}}
""")
    cfg = load_config(child)
    assert cfg["experiment"] == "child" and cfg["grpo"]["steps"] == 7
    assert cfg["grpo"]["group_size"] == 4  # kept from the parent: sections merge
    assert cfg["methods"]["kl-0.05"] == {"kl_beta": 0.05}
    assert cfg["methods"]["rs-0.2-0.0003"] == {"reset_every": 3, "kl_beta": 0.2, "lr": 3e-4}
    assert {"noreg", "kl", "resets", "gr", "signcert"} <= set(cfg["methods"])  # the parent's methods stay
    assert len(cfg["methods"]) == 5 + 2 + 2


def test_sweep_and_extends_errors_name_the_problem(tmp_path):
    micro = (REPO / "config" / "micro.yaml").read_text()
    bad = _write_text(tmp_path, "bad.yaml", micro + "\nsweeps: {kl: {grid: {kl_beta: [0.1, fast]}}}\n")
    with pytest.raises(ConfigError, match=r"methods.kl-fast.kl_beta: 'fast' is not of type 'number'"):
        load_config(bad)
    clash = _write_text(tmp_path, "clash.yaml", micro.replace("noreg: {}", "kl-0.1: {kl_beta: 0.5}")
                   + "\nsweeps: {kl: {grid: {kl_beta: [0.1]}}}\n")
    with pytest.raises(ConfigError, match="sweeps.kl makes method 'kl-0.1', which methods already names"):
        load_config(clash)
    _write_text(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write_text(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml \(extended by"):
        load_config(_write_text(tmp_path, "c.yaml", "extends: missing.yaml\n"))


def test_cluster_resources_name_a_rule_of_the_registry(tmp_path):
    """resources.jobs takes 'default' or a rule name, from the stage registry (a tool like bench is no rule)."""
    from rlhf.registry import STAGES
    from tests.conftest import write_config
    for rule in ("default", *(n for n, s in STAGES.items() if not s.tool)):
        load_config(write_config(tmp_path, resources={"jobs": {rule: {"cpus": 2}}}))
    for wrong in ("gpro", "bench"):
        with pytest.raises(ConfigError, match=f"resources.jobs: '{wrong}' is not one of"):
            load_config(write_config(tmp_path, resources={"jobs": {wrong: {"cpus": 2}}}))


def test_the_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is the schema rendered (make docs): a field added, removed or redocumented in the schema
    without regenerating the page fails here, so the reference cannot drift from what validation accepts."""
    from rlhf.schema_doc import render
    page = render()
    assert (REPO / "docs" / "configuration.md").read_text() == page, "run `make docs` (python -m rlhf.schema_doc)"
    assert "| `grpo.reward` | string | `\"proxy\"` |" in page and "## `gold.judge`" in page


@pytest.mark.parametrize("mechanisms, methods, match", [
    ({"method": "nope"}, None, r"mechanisms\.method: 'nope' is not a method"),
    ({"method": "noreg"}, None, r"mechanisms\.method: noreg keeps no rollouts; set grpo\.rollouts_every"),
])
def test_the_mechanisms_section_names_what_it_lacks(tmp_path, mechanisms, methods, match):
    cfg = _mini()
    cfg["mechanisms"] = mechanisms
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, cfg))
    cfg["methods"]["noreg"] = {"rollouts_every": 2}
    cfg["mechanisms"] = {"method": "noreg"}
    assert load_config(_write(tmp_path, cfg))["mechanisms"]["gold_quantile"] == 0.5


def test_an_rlvr_experiment_has_no_mechanisms(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "rlvr-miniature.yaml").read_text())
    cfg["grpo"] = {**cfg.get("grpo", {}), "rollouts_every": 2}
    cfg["mechanisms"] = {"method": next(iter(cfg["methods"]))}
    with pytest.raises(ConfigError, match=r"mechanisms\.method: .*RLVR experiment has no proxy RM"):
        load_config(_write(tmp_path, cfg))
