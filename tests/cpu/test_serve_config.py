"""Serve config and packaging checks that need no cluster.

python -m pytest tests/cpu/test_serve_config.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_deploy_yaml_is_a_valid_serve_config_that_builds():
    from ray.serve.schema import ServeDeploySchema

    from cm_ray.serve.app import app_builder

    data = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "cm_ray.serve.app:app_builder"
    built = app_builder({**app.args, "config": str(REPO / app.args["config"])})
    assert type(built).__name__ == "Application"


def test_auto_replicas_become_an_autoscaling_config():
    from cm_ray.serve.app import adapter_server_options

    cfg = load_config(REPO / "configs" / "demo.yaml", ["serve.num_replicas=auto",
                                                      "serve.max_replicas=3"])
    opts = adapter_server_options(cfg.serve)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 8}
    fixed = load_config(REPO / "configs" / "demo.yaml", ["serve.num_replicas=2"])
    assert adapter_server_options(fixed.serve)["num_replicas"] == 2


def test_api_key_env_must_be_set_and_the_key_never_ships(monkeypatch):
    from cm_ray.serve.app import build_app

    cfg = load_config(REPO / "configs" / "demo.yaml", ["serve.api_key_env=CM_RAY_NO_SUCH_KEY"])
    with pytest.raises(ValueError, match="CM_RAY_NO_SUCH_KEY"):
        build_app(cfg)
    monkeypatch.setenv("CM_RAY_NO_SUCH_KEY", "sk-secret-value")
    app = build_app(cfg)
    assert "sk-secret-value" not in repr(app._bound_deployment.init_args)


@pytest.mark.parametrize("override,field", [
    ("serve.num_replicas=0", "serve.num_replicas"), ("serve.num_replicas=many", "serve.num_replicas"),
    ("serve.max_ongoing_requests=2", "serve.max_ongoing_requests"),
    ("serve.route_prefix=api", "serve.route_prefix"), ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("router.threshold=1.5", "router.threshold"), ("router.kind=magic", "router.kind"),
])
def test_bad_serve_and_router_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_serve_modules_import_without_vllm_or_deepspeed():
    code = ("import sys, json, cm_ray.serve.app, cm_ray.serve.ingress, cm_ray.serve.adapters, "
            "cm_ray.serve.stage, cm_ray.router.model, cm_ray.router.stage; "
            "print(json.dumps([m for m in ('vllm', 'deepspeed', 'torch') if m in sys.modules]))")
    assert json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=REPO)) == []
