"""Availability flags for optional heavy dependencies (checked without importing them)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache
def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_vllm_available() -> bool:
    return is_available("vllm")


def is_deepspeed_available() -> bool:
    return is_available("deepspeed")


def require(module: str, extra: str) -> None:
    """Raise ImportError with the install command when ``module`` is missing."""
    if not is_available(module):
        raise ImportError(f"{module} is not installed; pip install 'cm_ray[{extra}]'")
