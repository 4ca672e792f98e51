"""Configs load, validate and name the offending field.  python -m pytest tests/cpu/test_config.py -v"""

from pathlib import Path

import pytest

from cm_ray.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.cultures and all(c.isupper() and len(c) == 2 for c in cfg.cultures)
    from cm_ray.tasks import load_task

    for task in cfg.tasks:
        load_task(task)


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS[0], ["train.lora_r=16", "search.qps=null", "cultures=[KOR, Japan]"])
    assert cfg.train.lora_r == 16 and cfg.search.qps is None
    assert cfg.cultures == ["KR", "JP"]


@pytest.mark.parametrize("override,field", [
    (["train.lora_r=0"], "train.lora_r"),
    (["train.lorar=3"], "train.lorar"),
    (["cultures=[XX]"], "cultures[0]"),
    (["search.top_k=abc"], "search.top_k"),
    (["train.mode=sometimes"], "train.mode"),
    (["recipe=magic"], "recipe"),
    (["cultures=[GB, GBR]"], "cultures"),
    (["serve.port=[1]"], "serve.port"),
    (["recipe=clca", "clca.turn_format=xml"], "clca.turn_format"),
    (["recipe=clca", "clca.max_turns=-1"], "clca.max_turns"),
    (["clca.scenarios_per_culture=two"], "clca.scenarios_per_culture"),
    (["recipe=culturemanager"], "clca.scenarios_per_culture"),  # clca's options, wrong recipe
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], override)
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_round_trip_through_dict():
    from cm_ray.config import config_from_dict

    cfg = load_config(CONFIGS[0])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_relative_root_is_resolved_at_load_so_workers_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS[0], ["root=artifacts/x"])
    assert cfg.root == str(tmp_path / "artifacts" / "x")
    assert load_config(CONFIGS[0], ["root=s3://bucket/p"]).root == "s3://bucket/p"
    with pytest.raises(ConfigError, match="^root: only local paths and s3://"):
        load_config(CONFIGS[0], ["root=gs://bucket/p"])
