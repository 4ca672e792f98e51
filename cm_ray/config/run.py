"""The whole run config (``Config``), YAML loading and dotted overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, field_validator, model_validator

from cm_ray.config.base import ConfigError, Section, invalid, to_config_error
from cm_ray.config.recipes import CLCAConfig, CultureSPAConfig
from cm_ray.config.sections import ChecksConfig, ModelsConfig, QueryConfig, RayConfig, SearchConfig, SynthesisConfig
from cm_ray.config.serving import EvalConfig, RouterConfig, ServeConfig
from cm_ray.config.train import TrainConfig
from cm_ray.safe_yaml import YAMLInputError, load, loads

RECIPES = ("culturemanager", "culturespa", "clca")
RECIPE_SECTIONS = ("culturespa", "clca")
"""Recipes with a section of their own (read only when the run uses that recipe)."""


class Config(Section):
    name: str = "demo"
    """Run name; also the manifest name."""
    root: str = "artifacts/demo"
    """Artifact root: a local path or s3://bucket/prefix (a local path is made absolute at load,
    so Ray workers that run elsewhere see the same directory)."""
    recipe: Literal["culturemanager", "culturespa", "clca"] = "culturemanager"
    """culturemanager, culturespa or clca."""
    cultures: list[str] = ["GB", "CN", "MX"]
    """Culture keys (ISO 3166-1 alpha-2). Aliases (alpha-3, names) are normalised at load."""
    tasks: list[str] = ["offensive", "survey"]
    """Task spec names (cm_ray/tasks/*.yaml) or paths to task YAMLs."""
    seed: int = 0
    ray: RayConfig = RayConfig()
    models: ModelsConfig = ModelsConfig()
    queries: QueryConfig = QueryConfig()
    search: SearchConfig = SearchConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    train: TrainConfig = TrainConfig()
    router: RouterConfig = RouterConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvalConfig = EvalConfig()
    culturespa: CultureSPAConfig = CultureSPAConfig()
    """Settings of the CultureSPA recipe (recipe: culturespa)."""
    clca: CLCAConfig = CLCAConfig()
    """Settings of the CLCA recipe (recipe: clca)."""
    checks: ChecksConfig = ChecksConfig()
    """Thresholds past which a degradation (a fallback provider, rejected LLM queries, an
    overlong prompt, ...) fails its stage (``cm_ray.checks``)."""

    @field_validator("cultures")
    @classmethod
    def _normalise_cultures(cls, cultures: list[str]) -> list[str]:
        from cm_ray.cultures import normalize_culture

        if not cultures:
            raise ValueError("must list at least one culture")
        keys = []
        for i, c in enumerate(cultures):
            try:
                keys.append(normalize_culture(c))
            except KeyError as e:
                raise invalid(f"[{i}]", e.args[0]) from None
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate cultures in {cultures}")
        return keys

    @field_validator("root")
    @classmethod
    def _resolve_root(cls, root: str) -> str:
        if not root:
            raise ValueError("must be a local path or s3:// URI")
        if "://" in root:
            if not root.startswith("s3://"):
                raise ValueError(f"only local paths and s3:// are supported, got {root!r}")
            return root
        # Resolved against the loading process's cwd once, so Ray workers (Tune trials, Serve
        # replicas) that run elsewhere see the same directory.
        return os.path.abspath(os.path.expanduser(root))

    @model_validator(mode="after")
    def _recipe_sections_match_the_recipe(self):
        for name in RECIPE_SECTIONS:
            section = getattr(self, name)
            if name == self.recipe:
                continue
            for key, info in type(section).model_fields.items():
                if key in section.model_fields_set and getattr(section, key) != info.get_default(call_default_factory=True):
                    raise invalid(f"{name}.{key}", f"a setting of the {name} recipe, but recipe is {self.recipe}")
        return self

    def to_dict(self) -> dict:
        """Every field as plain data; ``config_from_dict`` rebuilds the same Config."""
        return self.model_dump()


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (or any mapping in the YAML's shape)."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise to_config_error(e, Config) from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML, with ``safe_yaml``'s limits)
    to a nested dict; a malformed one is a ``ConfigError`` naming its key."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a dotted key")
        try:
            value = loads(raw, key.strip()) if raw != "" else ""
        except YAMLInputError as e:  # "<dotted key>: not valid YAML: ..."
            raise ConfigError(str(e)) from None
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key.strip()}: {'.'.join(parts[:i + 1])} is not a mapping")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a run config from YAML (None = all defaults) and apply dotted overrides."""
    data: Any = {}
    if path is not None:
        try:  # a directory, not UTF-8, not YAML, too large or an alias bomb: one error naming it
            data = load(path) or {}
        except YAMLInputError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(data, overrides))
