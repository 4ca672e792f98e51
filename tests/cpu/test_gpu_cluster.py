"""Parallel trials on a simulated GPU node: what a cluster's GPUs allow, Ray Tune runs at once.

A head without GPUs (2 CPUs, like a scheduling head that can still take CPU work) and one worker
node that declares 2 GPUs, both started with ``ray start`` on 127.0.0.1 (Ray takes declared GPUs
at face value; the work runs on CPU underneath). The train job is submitted with ``ray job submit``
as users run it, on the demo config with ``train.trials=per_adapter`` and ``train.use_gpu=true``
for 2 cultures, ``max_parallel_trials`` unset: both trials, of 1 GPU worker each, at once, every worker
on the GPU node, nothing GPU-bound on the head. ``train.backend=gloo``: the CPU build of torch has
no NCCL.

Where every other stage lands on GPU nodes (the vLLM engine of synthesis, the vLLM server, the
evaluation actors) is asserted by the rehearsal of the production config on cluster.yaml
(``tests/cpu/test_rehearse.py``), which runs all four jobs on such a cluster.

python -m pytest tests/cpu/test_gpu_cluster.py -v
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import RayNodes

pytestmark = pytest.mark.slow
CULTURES = ["GB", "CN"]  # 2 GPUs: both trials at once


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    nodes = RayNodes(tmp_path_factory.mktemp("gpu-cluster"))
    try:
        nodes.start_head(num_cpus=2, num_gpus=0)
        nodes.add_node(num_cpus=4, num_gpus=2)
        yield nodes
    finally:
        nodes.stop()


def _nodes(cluster) -> dict[str, float]:
    """node_id -> GPUs the node declares."""
    r = cluster.cli("list", "nodes", "--detail", "--format", "json", timeout=60)
    assert r.returncode == 0, r.stderr
    return {n["node_id"]: float(n["resources_total"].get("GPU", 0)) for n in json.loads(r.stdout)}


def _actors(cluster) -> list[dict]:
    r = cluster.cli("list", "actors", "--detail", "--format", "json", "--limit", "10000", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _tasks(cluster, actor_ids: set[str]) -> dict[str, list[dict]]:
    """Finished actor tasks of ``actor_ids`` (with start/end times), by actor."""
    r = cluster.cli("list", "tasks", "--detail", "--format", "json", "--limit", "10000",
                    "--filter", "type=ACTOR_TASK", timeout=120)
    assert r.returncode == 0, r.stderr
    out: dict[str, list[dict]] = {}
    for t in json.loads(r.stdout):
        if t.get("actor_id") in actor_ids and t.get("start_time_ms") and t.get("end_time_ms"):
            out.setdefault(t["actor_id"], []).append(t)
    return out


def _submit(cluster, job: str, overrides: list[str], sid: str, extra: list[str] = ()):
    r = cluster.cli("job", "submit", "--working-dir", ".", "--submission-id", sid, "--", "python",
                    f"jobs/{job}.py", "--config", "configs/demo.yaml", *extra, *overrides, timeout=1500)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    return r


def _gpu_actors(actors, class_part: str) -> list[dict]:
    return [a for a in actors if class_part in (a.get("class_name") or "")]


def _gpus(actor: dict) -> float:
    """GPUs an actor asked for; inside a placement group Ray names them GPU_group_<i>_<pg id>."""
    req = actor["required_resources"]
    if "GPU" in req:
        return req["GPU"]
    return max((v for k, v in req.items() if k.startswith("GPU_group_")), default=0.0)


def test_trials_run_in_parallel_on_the_gpus_of_a_simulated_gpu_node(gpu_cluster, tiny_model_dir, tmp_path):
    from cm_ray.storage import ArtifactStore
    from test_train_modes import write_rows

    gpus = _nodes(gpu_cluster)
    gpu_node = next(n for n, g in gpus.items() if g > 0)
    head_node = next(n for n, g in gpus.items() if g == 0)
    root = tmp_path / "artifacts"
    store = ArtifactStore(str(root))
    for c in CULTURES:  # the synthesis stage's rows, written as it writes them
        write_rows(store, c, 8)
    _submit(gpu_cluster, "train", [
        f"root={root}", f"cultures=[{','.join(CULTURES)}]", "tasks=[offensive]", f"models.base={tiny_model_dir}",
        "train.trials=per_adapter", "train.use_gpu=true", "train.backend=gloo", "train.joint_baseline=false",
        "train.max_steps=2", "train.epochs=1", "train.batch_size=2", "train.max_seq_len=256"], f"train-{os.getpid()}")
    for c in CULTURES:
        assert store.exists("adapters", c, "current.json"), c
    workers = [a for a in _gpu_actors(_actors(gpu_cluster), "RayTrainWorker") if _gpus(a)]
    assert len(workers) >= len(CULTURES), [(a["class_name"], a["required_resources"]) for a in _actors(gpu_cluster)]
    assert all(a["node_id"] == gpu_node for a in workers)
    # When each worker ran: the span of its actor tasks (the state API keeps their times).
    tasks = _tasks(gpu_cluster, {a["actor_id"] for a in workers})
    spans = sorted((min(t["start_time_ms"] for t in ts), max(t["end_time_ms"] for t in ts))
                   for ts in tasks.values())
    assert len(spans) == len(workers), tasks.keys()
    overlap = any(s2 < e1 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    assert overlap, f"no two trials ran at the same time: {spans}"
    # Nothing that asked for a GPU ran on the head; the job's driver did (it asks for nothing).
    assert not [a for a in _actors(gpu_cluster) if _gpus(a) and a["node_id"] == head_node]
