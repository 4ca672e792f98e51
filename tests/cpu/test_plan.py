"""Sizing from the cluster's configured capacity and ``cm-ray plan`` (no Ray started here).

python -m pytest tests/cpu/test_plan.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm_ray.cluster import Cluster, NodeType, load_cluster_file
from cm_ray.config import load_config
from cm_ray.resources import PlacementError, check, parallel_trials, stage_requests, synthesis_uses_gpu

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper.yaml"


def _cluster(gpu_max: int = 4, gpus_per_node: int = 1) -> Cluster:
    return Cluster([NodeType("head", {"CPU": 0.0}, head=True),
                    NodeType("cpu", {"CPU": 16.0}, max_workers=10),
                    NodeType("gpu", {"CPU": 8.0, "GPU": float(gpus_per_node)}, max_workers=gpu_max)], "test")


@pytest.mark.parametrize("path", ["cluster.yaml", "k8s/rayjob.yaml", "k8s/rayservice.yaml"])
def test_cluster_files_give_node_types_with_max_counts(path):
    c = load_cluster_file(REPO / path)
    head = [t for t in c.node_types if t.head]
    assert len(head) == 1 and head[0].resources.get("CPU") == 0 and not head[0].resources.get("GPU")
    gpu = [t for t in c.node_types if t.resources.get("GPU")]
    assert gpu and all(t.max_workers >= 1 for t in gpu)
    assert c.max_resources()["GPU"] == sum(t.resources["GPU"] * t.max_workers for t in gpu)


def test_parallel_trials_come_from_the_autoscalers_maximum_not_free_resources():
    cfg = load_config(PAPER, ["train.num_workers=2"])
    assert cfg.train.max_parallel_trials is None
    # 4 GPU nodes of 1 GPU at most: 2 trials of 2 GPU workers, whatever runs now (nothing, cold).
    assert parallel_trials(cfg, _cluster(gpu_max=4), 11) == 2
    assert parallel_trials(cfg, _cluster(gpu_max=40), 11) == 11
    assert parallel_trials(cfg, _cluster(gpu_max=22, gpus_per_node=2), 11) == 11
    pinned = load_config(PAPER, ["train.max_parallel_trials=3"])
    assert parallel_trials(pinned, _cluster(gpu_max=40), 11) == 3


def test_synthesis_accelerator_auto_follows_the_cluster_not_the_driver():
    cfg = load_config(PAPER, ["synthesis.accelerator=auto"])
    assert synthesis_uses_gpu(cfg, _cluster()) is True
    cpu_only = Cluster([NodeType("head", {"CPU": 8.0}, head=True)], "cpu")
    assert synthesis_uses_gpu(cfg, cpu_only) is False
    reqs = {r.stage: r for r in stage_requests(cfg, _cluster(), 11)}
    assert reqs["synthesize"].bundles == [{"GPU": 1.0, "CPU": 2.0}] and reqs["synthesize"].count == 4
    assert reqs["synthesize"].strategy == "STRICT_PACK"
    tp = load_config(PAPER, ["synthesis.vllm.tensor_parallel_size=4"])
    assert len({r.stage: r for r in stage_requests(tp, _cluster(), 11)}["synthesize"].bundles) == 4


def test_a_request_no_node_type_holds_is_an_error_naming_stage_and_resource():
    cfg = load_config(PAPER, ["synthesis.vllm.tensor_parallel_size=2"])
    cluster = _cluster(gpus_per_node=1)  # tp=2 on one node needs 2 GPUs per node
    with pytest.raises(PlacementError, match=r"synthesize: .*GPU: at most 1 per node"):
        check(stage_requests(cfg, cluster, 11), cluster)
    serve = load_config(PAPER, ["serve.num_gpus=1", "serve.ray_actor_cpus=32"])
    with pytest.raises(PlacementError, match=r"serve: adapter-server replica.*CPU: at most 16 per node"):
        check(stage_requests(serve, _cluster(), 11), _cluster())


def _plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm_ray.cli", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plan_of_the_paper_config_puts_every_gpu_stage_on_gpu_node_types():
    r = _plan(str(PAPER), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    stages = {(s["stage"], s["what"]): s for s in plan["stages"]}
    gpu_bound = [s for s in plan["stages"] if s["gpu_bound"]]
    assert {s["stage"] for s in gpu_bound} == {"queries", "synthesize", "train", "serve", "evaluate"}
    for s in gpu_bound:
        assert s["node_types"] == ["gpu_ondemand"] and s["totals"]["GPU"] > 0, s
    train = next(s for (stage, _), s in stages.items() if stage == "train")
    assert train["count"] == plan["work"]["trials"] == 11  # every trial at once on cluster.yaml
    assert plan["work"]["synth_partitions"] == 50 and plan["cluster"]["source"].endswith("cluster.yaml")
    # The estimate names what was never measured instead of guessing it.
    rows = {row["stage"]: row for row in plan["estimate"]["rows"]}
    assert all(row["hours"] is not None or row["missing"] or row["note"] for row in rows.values())
    text = _plan(str(PAPER))
    assert text.returncode == 0 and "gpu_ondemand" in text.stdout and "estimate" in text.stdout


def test_plan_refuses_a_config_the_cluster_cannot_host(tmp_path):
    small = yaml.safe_load((REPO / "cluster.yaml").read_text())
    small["available_node_types"]["gpu_ondemand"]["resources"] = {"CPU": 8, "GPU": 1}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(small))
    r = _plan(str(PAPER), "synthesis.vllm.tensor_parallel_size=2", "--cluster", str(path))
    assert r.returncode == 2 and "synthesize" in r.stderr and "GPU" in r.stderr, r.stderr


def test_plan_for_the_local_demo_has_no_gpu_stage():
    r = _plan(str(REPO / "configs" / "demo.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert not [s for s in plan["stages"] if s["gpu_bound"]]
    assert plan["cluster"]["source"].startswith("local")
