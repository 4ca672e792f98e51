"""The cluster files give every node the credentials the production run needs, through the node
environment (never a runtime_env); CPU nodes install no CUDA stack; the GPU extra has a ceiling.

python -m pytest tests/cpu/test_cluster_secrets.py -q
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cm_ray.config import load_config
from cm_ray.rehearsal.secrets import missing, needed, provisioned

REPO = Path(__file__).resolve().parents[2]
FILES = ["cluster.yaml", "k8s/rayjob.yaml", "k8s/rayservice.yaml"]


def _doc(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_paper_run_needs_the_hub_token_and_the_serve_key():
    need = needed(load_config(REPO / "configs" / "paper.yaml"))
    assert "HF_TOKEN" in need and "gated" in need["HF_TOKEN"]
    assert need.get("CM_RAY_API_KEY") == "serve.api_key_env"
    brave = needed(load_config(REPO / "configs" / "paper.yaml",
                               ["search.provider=brave", "search.fallback=[tavily]"]))
    assert brave["BRAVE_API_KEY"] == "search provider brave" and "TAVILY_API_KEY" in brave


@pytest.mark.parametrize("name", FILES)
def test_every_node_type_of_the_cluster_files_is_given_the_secrets(name):
    need = needed(load_config(REPO / "configs" / "paper.yaml"))
    prov = provisioned(_doc(name))
    assert len(prov) >= 2, prov  # the head and the worker groups
    assert missing(need, prov) == {}


def test_a_node_type_whose_ray_start_does_not_source_the_secrets_lacks_them():
    doc = copy.deepcopy(_doc("cluster.yaml"))
    doc["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    need = needed(load_config(REPO / "configs" / "paper.yaml"))
    lack = missing(need, provisioned(doc))
    assert set(lack) == {"cpu_spot", "gpu_ondemand"} and "HF_TOKEN" in lack["gpu_ondemand"]
    k8s = copy.deepcopy(_doc("k8s/rayjob.yaml"))
    del k8s["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["envFrom"]
    assert set(missing(need, provisioned(k8s))) == {"gpu"}


def test_node_secrets_exports_a_secrets_manager_secret_for_ray_start(s3_endpoint, tmp_path):
    import boto3

    value = {"HF_TOKEN": "hf_abc 'quoted' $NOT_EXPANDED", "CM_RAY_API_KEY": "k-1"}
    boto3.client("secretsmanager").create_secret(Name="cm-ray/secrets-test", SecretString=json.dumps(value))
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "cm_ray.node_secrets", "cm-ray/secrets-test"], env=env,
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp_path / "secrets.env").write_text(r.stdout)
    out = subprocess.check_output(["bash", "-c", f". {tmp_path / 'secrets.env'}; env -0"], env={"PATH": "/usr/bin:/bin"})
    got = dict(kv.split("=", 1) for kv in out.decode().split("\0") if "=" in kv)
    assert got["HF_TOKEN"] == value["HF_TOKEN"] and got["CM_RAY_API_KEY"] == "k-1"
    bad = subprocess.run([sys.executable, "-m", "cm_ray.node_secrets", "cm-ray/nope"], env=env,
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 1 and "cm-ray/nope" in bad.stderr and "Traceback" not in bad.stderr


def test_cpu_nodes_install_no_cuda_stack_and_the_gpu_extra_has_a_ceiling():
    from packaging.requirements import Requirement

    doc = _doc("cluster.yaml")
    cpu = doc["available_node_types"]["cpu_spot"]
    assert cpu["docker"]["worker_image"].endswith("-cpu")
    setup = " ".join(doc.get("setup_commands", []) + cpu["worker_setup_commands"])
    assert "[gpu]" not in setup and "torch==2.13.0+cpu" in setup
    k8s = _doc("k8s/rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert next(g for g in k8s if g["groupName"] == "cpu-spot")["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for req in map(Requirement, extras["gpu"]):
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req} has no upper bound"
