"""cluster.yaml and the KubeRay manifests validate against Ray's own schemas.

python -m pytest tests/cpu/test_cluster_config.py -v
"""

import json
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_autoscaler_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)
    validate_config(prepare_config(_cluster()))


def test_cluster_shape_zero_cpu_head_spot_cpu_ondemand_gpu_from_zero():
    import ray

    c = _cluster()
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"]["CPU"] == 0
    cpu, gpu = types["cpu_spot"], types["gpu_ondemand"]
    assert cpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in gpu["node_config"] and gpu["resources"]["GPU"] >= 1
    for t in (cpu, gpu):
        assert t["min_workers"] == 0 and t["max_workers"] > 0
    assert c["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")
    for name, t in types.items():  # every node type installs the project (head: head_setup_commands)
        setup = c["setup_commands"] + (c["head_setup_commands"] if name == c["head_node_type"]
                                       else t.get("worker_setup_commands", c.get("worker_setup_commands", [])))
        assert any("pip install" in cmd and "cm_ray" in cmd for cmd in setup), name


def test_rayjob_manifest_runs_a_job_entry_point():
    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/synthesize.py"] and (REPO / entry[1]).exists()
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_rayservice_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    app = serve_cfg.applications[0]
    module, attr = app.import_path.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    assert (REPO / app.args["config"]).exists()
