"""cm_ray: task-aware culture management for LLMs on Ray.

Importing this package is cheap: torch, ray, vllm and deepspeed are imported only by the stage
that needs them.
"""

__version__ = "0.1.0"

from cm_ray.config import Config, ConfigError, load_config  # noqa: E402  (stdlib + yaml only)

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
