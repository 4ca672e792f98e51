"""The config library's base: ``Section`` (the pydantic model every section derives from),
``ConfigError`` and the translation of pydantic errors into messages that name the dotted field
and the bad value (``train.lora_r: must be positive, got 0``)."""

from __future__ import annotations

import types
import typing
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file or override is invalid; the message starts with the field's dotted path."""


class Section(BaseModel):
    """A config section: unknown keys are errors, values are not coerced (``"8"`` is no integer),
    every field is documented by the docstring under it."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` (what ``dataclasses.replace`` did for the old config)."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as e:
            raise to_config_error(e, type(self)) from None


def invalid(field: str, msg: str) -> PydanticCustomError:
    """An error to raise from a validator, naming ``field`` relative to the model it validates
    (``"continual_first"``, ``"[0]"``, ``"zero_optimization.stage"``)."""
    return PydanticCustomError("cm_ray_field", "{field}: {msg}", {"field": field, "msg": msg})


def dotted(loc: tuple) -> str:
    """``("search", "fallback", 0)`` -> ``search.fallback[0]`` (dict-key markers dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out and not str(part).startswith("[") else str(part)
    return out


def _field(model: type, loc: tuple):
    """The FieldInfo that ``loc`` names under ``model``, or None (list items, dict values)."""
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        ann = info.annotation
        args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def _nullable(info) -> bool:
    ann = info.annotation
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(info) -> str | None:
    lo = hi = None
    for m in info.metadata:
        for name, fmt in (("gt", "({}"), ("ge", "[{}")):
            if getattr(m, name, None) is not None:
                lo = fmt.format(_num(getattr(m, name)))
        for name, fmt in (("lt", "{})"), ("le", "{}]")):
            if getattr(m, name, None) is not None:
                hi = fmt.format(_num(getattr(m, name)))
    return f"must be in {lo}, {hi}" if lo and hi else None


_TYPES = {"int_type": "expected an integer", "int_parsing": "expected an integer",
          "int_from_float": "expected an integer", "float_type": "expected a number",
          "float_parsing": "expected a number", "bool_type": "expected true/false",
          "bool_parsing": "expected true/false", "string_type": "expected a string",
          "list_type": "expected a list", "dict_type": "expected a mapping",
          "model_type": "expected a mapping", "model_attributes_type": "expected a mapping"}


def _message(err: dict, model: type, where: str) -> str:
    from cm_ray.config.renamed import RENAMED, renamed_message

    kind, ctx, loc = err["type"], err.get("ctx") or {}, err["loc"]
    if kind == "cm_ray_field":
        field = ctx["field"]
        full = where + field if field.startswith("[") or not dotted(loc) else f"{where}.{field}"
        return f"{full.removeprefix('<root>')}: {ctx['msg']}"
    if kind == "extra_forbidden":
        for key in err["input"] if isinstance(err.get("input"), dict) else ():
            if f"{where}.{key}" in RENAMED:  # e.g. recipe_options.max_turns -> clca.max_turns
                return f"{where}.{key}: {renamed_message(f'{where}.{key}')}"
        if where in RENAMED:
            return f"{where}: {renamed_message(where)}"
        parent = _field(model, loc[:-1])
        owner = model if len(loc) == 1 else (parent.annotation if parent else None)
        known = ", ".join(getattr(owner, "model_fields", {})) if isinstance(owner, type) else ""
        return f"{where}: unknown field" + (f" (known: {known})" if known else "")
    if kind == "value_error":
        return f"{where}: {ctx.get('error', err['msg'])}"
    info = _field(model, loc)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        text = (info and _interval(info)) or {
            "greater_than": "must be positive" if ctx.get("gt") == 0 and not (info and _nullable(info))
            else f"must be > {_num(ctx.get('gt'))}",
            "greater_than_equal": f"must be >= {_num(ctx.get('ge'))}",
            "less_than": f"must be < {_num(ctx.get('lt'))}",
            "less_than_equal": f"must be <= {_num(ctx.get('le'))}"}[kind]
    elif kind == "literal_error":
        text = f"must be {ctx['expected']}"
    elif kind == "too_short":
        text = f"must list at least {ctx.get('min_length', 1)}"
    else:
        text = _TYPES.get(kind) or err["msg"][:1].lower() + err["msg"][1:]
    if info is not None and _nullable(info):
        text += " or null"
    return f"{where}: {text}, got {err.get('input')!r}"


def to_config_error(e: ValidationError, model: type, prefix: str = "") -> ConfigError:
    """The first error of ``e`` as a ConfigError naming its dotted path (``prefix`` goes first)."""
    errors = e.errors()
    first = errors[0]
    if first["type"] == "value_error" and isinstance((first.get("ctx") or {}).get("error"), ConfigError):
        return first["ctx"]["error"]  # a check that already names its field (e.g. a task spec's)
    where = dotted(first["loc"]) or "<root>"
    msg = _message(first, model, where)
    if prefix:
        msg = f"{prefix}.{msg}" if not msg.startswith("[") else prefix + msg
    more = len(errors) - 1
    return ConfigError(msg + (f" (and {more} more error{'s' * (more > 1)})" if more else ""))


@lru_cache(maxsize=None)
def _holder(cls: type) -> type:
    return create_model(f"_{cls.__name__}", __config__=ConfigDict(extra="forbid"), value=(cls, ...))


def build(cls: type, data: dict, path: str = "") -> Any:
    """Validate ``data`` into ``cls`` (a Section or a plain dataclass); errors name the field
    under ``path``."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise to_config_error(e, cls, path) from None
    holder = _holder(cls)
    try:
        return holder.model_validate({"value": data}).value
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "value_error" and isinstance((first.get("ctx") or {}).get("error"), ConfigError):
            raise first["ctx"]["error"] from None
        loc = first["loc"][1:]
        msg = _message({**first, "loc": loc}, cls, dotted(loc) or "<root>")
        raise ConfigError(f"{path}.{msg}" if path else msg) from None
