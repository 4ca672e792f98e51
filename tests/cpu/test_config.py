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


# ---------------------------------------------------------------- pydantic config, presets ----


def test_an_explicit_value_beats_the_preset(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  preset: clca\n  lora_r: 8\n")
    tc = load_config(cfg).train
    assert tc.lora_r == 8  # set explicitly, kept (it used to become the preset's 4)
    assert (tc.lora_alpha, tc.lora_dropout, tc.batch_size, tc.grad_accum, tc.epochs) == (0.1, 0.5, 2, 4, 3.0)
    assert load_config(cfg, ["train.lora_r=16"]).train.lora_r == 16
    assert load_config(cfg, ["train.lora_r=4"]).train.lora_r == 4
    assert load_config(None, ["train.preset=clca"]).train.lora_r == 4  # unset: the preset's


def test_presets_are_yaml_data_for_every_allowed_name():
    from typing import get_args

    from cm_ray.config import PRESETS, TrainConfig
    from cm_ray.config.train import PRESET_DIR

    allowed = {a for a in get_args(TrainConfig.model_fields["preset"].annotation) if a is not type(None)}
    names = {n for a in allowed for n in get_args(a)}
    assert names == set(PRESETS) == {p.stem for p in PRESET_DIR.glob("*.yaml")}
    for name, values in PRESETS.items():
        assert set(values) <= set(TrainConfig.model_fields), name
        TrainConfig(**values)  # every preset value is valid on its own


@pytest.mark.parametrize("old,new", [
    ("synthesis.openai_qps=3", "synthesis.openai.qps"),
    ("synthesis.openai_base_url=http://x/v1", "synthesis.openai.base_url"),
    ("synthesis.vllm_max_num_seqs=4", "synthesis.vllm.max_num_seqs"),
    ("search.fetch_pages=true", "search.fetch.enabled"),
    ("search.allow_private_urls=true", "search.fetch.allow_private_urls"),
    ("recipe_options.max_turns=3", "clca.max_turns"),
    ("recipe_options.topics=[0]", "culturespa.topics"),
    ("train.joint_system_prompt=hi", "culture_system_prompt"),
])
def test_a_renamed_or_removed_key_names_its_replacement(old, new):
    with pytest.raises(ConfigError) as err:
        load_config(None, [old])
    assert str(err.value).startswith(old.split("=")[0] + ":"), str(err.value)
    assert new in str(err.value)


def test_renamed_table_points_at_fields_that_exist():
    from cm_ray.config import RENAMED

    for old, new in RENAMED.items():
        if new.startswith("removed:") or " " in new:
            continue
        section, *rest = new.split(".")
        model = Config.model_fields[section].annotation
        for part in rest[:-1]:
            model = model.model_fields[part].annotation
        assert rest[-1] in model.model_fields, (old, new)


def test_nested_overrides_reach_nested_sections():
    cfg = load_config(None, ["synthesis.openai.qps=3", "synthesis.vllm.engine_kwargs={gpu_memory_utilization: 0.5}",
                             "search.fetch.enabled=true", "search.fetch.top_k=1", "recipe=culturespa",
                             "culturespa.topics=[0, Migration]"])
    assert cfg.synthesis.openai.qps == 3.0 and cfg.synthesis.openai.max_in_flight == 8
    assert cfg.synthesis.vllm.engine_kwargs == {"gpu_memory_utilization": 0.5}
    assert cfg.search.fetch.enabled and cfg.search.fetch.top_k == 1 and cfg.search.fetch.max_bytes == 2_000_000
    assert cfg.culturespa.topics == [0, "Migration"]
    assert load_config(None, ["recipe=clca", "clca.turn_format=text"]).clca.turn_format == "text"


@pytest.mark.parametrize("override,message", [
    ("synthesis.openai.qps=-1", "synthesis.openai.qps: must be > 0 or null, got -1"),
    ("search.fetch.top_k=0", "search.fetch.top_k: must be positive, got 0"),
    ("search.fetch.enabled=maybe", "search.fetch.enabled: expected true/false, got 'maybe'"),
    ("synthesis.top_p=1.5", "synthesis.top_p: must be in (0, 1], got 1.5"),
    ("clca.turn_format=xml", "clca.turn_format: must be 'json' or 'text', got 'xml'"),
    ("train.lora_r=8.5", "train.lora_r: expected an integer, got 8.5"),
    ("evaluate.systems=[base, magic]", "evaluate.systems[1]: must be"),
    ("synthesis.vllm.typo=1", "synthesis.vllm.typo: unknown field (known: max_model_len"),
])
def test_a_bad_value_names_the_dotted_field_and_the_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_every_shipped_config_round_trips_and_pickles():
    import pickle

    from cm_ray.config import config_from_dict

    for path in CONFIGS:
        cfg = load_config(path)
        assert config_from_dict(cfg.to_dict()) == cfg, path.name
        assert pickle.loads(pickle.dumps(cfg.synthesis)) == cfg.synthesis


def test_replace_validates_like_loading():
    cfg = load_config(None)
    assert cfg.replace(cultures=["GBR", "Japan"]).cultures == ["GB", "JP"]
    with pytest.raises(ConfigError, match=r"^cultures\[0\]"):
        cfg.replace(cultures=["XX"])


def test_fields_keep_their_docstrings():
    from cm_ray.config import SearchConfig, TrainConfig

    assert "seed papers" in TrainConfig.model_fields["preset"].description
    assert "private" in SearchConfig.model_fields["fetch"].annotation.model_fields["allow_private_urls"].description


def test_provider_names_match_the_providers_and_config_imports_no_stage():
    import json
    import subprocess
    import sys

    from cm_ray.config import PROVIDER_NAMES
    from cm_ray.data.providers import PROVIDERS

    assert tuple(PROVIDERS) == PROVIDER_NAMES
    code = "import sys, json, cm_ray.config; print(json.dumps(sorted(m for m in sys.modules if m.startswith('cm_ray'))))"
    mods = json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]))
    assert not [m for m in mods if m.startswith("cm_ray.data")], mods


def test_quality_config_generates_320_per_pair_and_evaluates_every_system():
    """What the quality run kept of these generations is measured, not predicted (README: Results;
    dedup bounds it: the shipped corpus gives ~20 snippets per culture)."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quality.yaml")
    assert cfg.synthesis.prompts_per_pair * cfg.synthesis.samples_per_prompt >= 320
    assert cfg.synthesis.engine == "vllm" and cfg.train.joint_baseline and cfg.train.mode == "per_culture"
    assert {"culturemanager", "culturemanager_locale", "oracle", "prompted", "base", "joint"} <= set(cfg.evaluate.systems)
    assert cfg.evaluate.bootstrap >= 1000 and cfg.evaluate.max_questions >= 200
