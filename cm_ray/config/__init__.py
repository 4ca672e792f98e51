"""Run configuration: pydantic models, one YAML per run, dotted overrides.

``load_config("configs/demo.yaml", ["train.lora_r=16"])`` reads the YAML, applies the overrides
and validates the nested sections. Every error names the offending field by its dotted path and
shows the bad value (``train.lora_r: must be positive, got 0``); a renamed or removed key names
its replacement (``RENAMED``). Every field is documented by the docstring under it.

Modules: ``base`` (Section, errors), ``sections`` (ray, models, queries, search, synthesis),
``train`` (train + presets/*.yaml), ``serving`` (router, serve, evaluate), ``recipes``
(culturespa, clca), ``run`` (Config, loading), ``renamed`` (old keys).
"""

from cm_ray.config.base import ConfigError, Section, build
from cm_ray.config.recipes import CLCAConfig, CultureSPAConfig
from cm_ray.config.renamed import RENAMED
from cm_ray.config.run import Config, apply_overrides, config_from_dict, load_config
from cm_ray.config.sections import (PROVIDER_NAMES, ChecksConfig, FetchConfig, ModelsConfig, OpenAIConfig, QueryConfig,
                                    RayConfig, SearchConfig, SynthesisConfig, VLLMConfig)
from cm_ray.config.serving import EvalConfig, RouterConfig, ServeConfig
from cm_ray.config.train import PRESETS, TrainConfig, apply_preset

__all__ = ["CLCAConfig", "ChecksConfig", "Config", "ConfigError", "CultureSPAConfig", "EvalConfig", "FetchConfig",
           "ModelsConfig", "OpenAIConfig", "PRESETS", "PROVIDER_NAMES", "QueryConfig", "RENAMED",
           "RayConfig", "RouterConfig", "SearchConfig", "Section", "ServeConfig", "SynthesisConfig",
           "TrainConfig", "VLLMConfig", "apply_overrides", "apply_preset", "build", "config_from_dict",
           "load_config"]
