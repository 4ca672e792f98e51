"""The rehearsal cluster: cluster.yaml's node types started here, each node with private caches, and
models resolved on the node that uses them.

``LocalCluster(node_plan("cluster.yaml"))`` starts a head with 0 CPUs, one ``cpu_spot`` worker
and two ``gpu_ondemand`` workers (declared GPUs and ``accelerator_type:L40S``), each in its own
mount namespace with a tmpfs over the model caches. A driver process (this file run as a script,
connected to the cluster) then asks tasks pinned to each node what they see.

python -m pytest tests/cpu/test_rehearsal_cluster.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = "embedded:smollm2-135m-instruct"


def test_plan_follows_the_cluster_file():
    from cm_ray.rehearsal.cluster import node_plan

    plan = node_plan(REPO / "cluster.yaml")
    assert [(s.name, s.node_type, s.head) for s in plan] == [
        ("head", "head", True), ("cpu_spot-0", "cpu_spot", False),
        ("gpu_ondemand-0", "gpu_ondemand", False), ("gpu_ondemand-1", "gpu_ondemand", False)]
    head, cpu, gpu = plan[0].ray_args(), plan[1].ray_args(), plan[2].ray_args()
    assert "--num-cpus=0" in head and "--num-gpus=0" in head
    assert "--num-cpus=16" in cpu and "--num-gpus=0" in cpu
    assert "--num-cpus=8" in gpu and "--num-gpus=1" in gpu
    assert json.loads(next(a for a in gpu if a.startswith("--resources="))[len("--resources="):]) == \
        {"accelerator_type:L40S": 1.0}
    assert all(any(a.startswith("--object-store-memory=") for a in s.ray_args()) for s in plan)
    scaled = node_plan(REPO / "cluster.yaml", {"gpu_ondemand": 3, "cpu_spot": 0})
    assert [s.node_type for s in scaled] == ["head"] + ["gpu_ondemand"] * 3
    with pytest.raises(ValueError, match="max_nodes_per_type: no node type.*gpu_spot"):
        node_plan(REPO / "cluster.yaml", {"gpu_spot": 1})
    kube = node_plan(REPO / "k8s" / "rayjob.yaml")
    assert kube[0].head and "--num-cpus=0" in kube[0].ray_args()
    assert any("--num-gpus=1" in s.ray_args() for s in kube)


# ---------------------------------------------------------------------------------------------
# On a started cluster (slow).


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from cm_ray.rehearsal.cluster import LocalCluster, node_plan

    with LocalCluster(node_plan(REPO / "cluster.yaml"), tmp_path_factory.mktemp("rehearsal")) as c:
        yield c


def drive(cluster, case: str, timeout: float = 900) -> dict:
    """Run ``case`` of this file as a Ray driver connected to ``cluster``; its JSON result."""
    ids = {n["name"]: n["node_id"] for n in cluster.nodes}
    r = subprocess.run([sys.executable, __file__, case, json.dumps(ids), cluster.dashboard_url],
                       env={**cluster.env, "RAY_ADDRESS": cluster.gcs}, cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cluster_has_the_files_node_types(rehearsal):
    nodes = {n["name"]: n for n in rehearsal.nodes}
    assert set(nodes) == {"head", "cpu_spot-0", "gpu_ondemand-0", "gpu_ondemand-1"}
    assert nodes["head"]["node_type"] == "head" and nodes["head"]["resources"].get("CPU", 0) == 0
    assert nodes["head"]["resources"].get("GPU", 0) == 0
    assert nodes["cpu_spot-0"]["resources"]["CPU"] == 16 and not nodes["cpu_spot-0"]["resources"].get("GPU")
    for name in ("gpu_ondemand-0", "gpu_ondemand-1"):
        res = nodes[name]["resources"]
        assert nodes[name]["node_type"] == "gpu_ondemand"
        assert (res["CPU"], res["GPU"], res["accelerator_type:L40S"]) == (8, 1, 1)
    assert rehearsal.dashboard_url.startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_model_cache_is_private_to_each_node(rehearsal):
    got = drive(rehearsal, "private_cache")
    assert got["head"] == {"models": True, "hf": True, "tmp": True}  # written and read on the head
    for name in ("cpu_spot-0", "gpu_ondemand-0"):
        assert got[name] == {"models": False, "hf": False, "tmp": False}, name
    assert got["venv_shared"] and not os.path.exists(got["path"])  # nor on this machine's disk


@pytest.mark.slow
def test_workers_resolve_the_generator_on_their_own_node(rehearsal):
    """ray.data.llm's stages get the reference and resolve it in their actor: a worker node loads
    the embedded SmolLM2 from its own cache (a path resolved by the driver does not exist there)."""
    got = drive(rehearsal, "processor")
    assert got["model_source"] == SMOLLM2
    chat = got["chat_template_on_gpu_node"]
    assert chat["node_id"] == rehearsal.node_id("gpu_ondemand-0")
    assert chat["exists_there"] and chat["path"].endswith("models/smollm2-135m-instruct")
    assert chat["prompt"].startswith("<|im_start|>") and "Hola" in chat["prompt"]
    assert got["engine_stage_resolves"]
    # and its CPU replica still asks for a CPU bundle, no GPU (the stage was not re-validated)
    assert got["engine_remote_args"] == {"num_cpus": 1, "num_gpus": None}
    tok = got["train_tokenizer_on_cpu_node"]  # train: tokenizer tasks get the reference too
    assert tok["node_id"] == rehearsal.node_id("cpu_spot-0") and tok["rows"] == 1 and tok["tokens"] > 5


@pytest.mark.slow
def test_a_model_a_worker_cannot_open_names_reference_and_node(rehearsal):
    got = drive(rehearsal, "unreadable")
    worker = rehearsal.node_id("gpu_ondemand-1")
    assert got["head_has_it"] and got["ref"] == got["head_path"]
    assert got["head_path"] in got["error"] and worker in got["error"] and worker in got["node"]
    assert got["record"]["kind"] == "unreadable" and got["record"]["bad"] == got["record"]["total"] == 3
    assert "cannot be opened on node" in got["record"]["detail"]


@pytest.mark.slow
def test_placements_name_node_types_and_flag_undeclared_resources(rehearsal):
    got = drive(rehearsal, "placements")
    gpu_actor = [r for r in got["rows"] if r["kind"] == "actor" and r["name"].endswith("GpuProbe")]
    assert gpu_actor, [(r["kind"], r["name"]) for r in got["rows"]]
    assert gpu_actor[0]["node_type"] == "gpu_ondemand" and gpu_actor[0]["requested"]["GPU"] == 1
    bundles = [r for r in got["rows"] if r["kind"] == "bundle" and r["name"].startswith("probe-pg")]
    assert bundles and {b["node_type"] for b in bundles} == {"gpu_ondemand"}
    task = [r for r in got["rows"] if r["kind"] == "task" and "cpu_probe" in (r["name"] or "")]
    assert task and task[0]["node_type"] in ("cpu_spot", "gpu_ondemand") and task[0]["ok"]
    assert got["misplaced"] == []  # as declared in cluster.yaml
    # Against a file whose gpu_ondemand declares no GPU, the GPU actor and bundle are flagged.
    flagged = {(r["kind"], r["name"]) for r in got["misplaced_without_gpus"]}
    assert any(k == "actor" and n.endswith("GpuProbe") for k, n in flagged) and any(k == "bundle" for k, _ in flagged)
    assert got["record"]["kind"] == "placement" and got["record"]["bad"] >= 2


# ---------------------------------------------------------------------------------------------
# The driver side of the slow tests: ``python test_rehearsal_cluster.py <case> <node ids> <url>``.


def _on(node_id: str, fn, *args):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pin = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(ray.remote(fn).options(num_cpus=0, scheduling_strategy=pin).remote(*args), timeout=900)


def _probe(tag: str, write: bool) -> dict:
    from cm_ray.models import cache_root

    paths = {"models": cache_root() / "models" / tag, "hf": Path.home() / ".cache" / "huggingface" / tag,
             "tmp": Path(os.environ.get("TMPDIR", "/tmp")) / tag}
    if write:
        for p in paths.values():
            p.write_text("written on this node")
    return {k: p.exists() for k, p in paths.items()}


def _case_private_cache(ids: dict, url: str) -> dict:
    import uuid

    from cm_ray.models import cache_root

    tag = f"probe-{uuid.uuid4().hex[:8]}"
    out = {"head": _on(ids["head"], _probe, tag, True), "path": str(cache_root() / "models" / tag)}
    out.update({n: _on(ids[n], _probe, tag, False) for n in ("cpu_spot-0", "gpu_ondemand-0")})
    out["venv_shared"] = _on(ids["gpu_ondemand-0"], lambda: Path(sys.executable).exists())
    return out


def _chat_template(fn, kwargs: dict) -> dict:
    import ray

    udf = fn(**kwargs)
    path = str(udf.processor.name_or_path)
    prompt = udf.processor.apply_chat_template([{"role": "user", "content": "Hola"}], tokenize=False,
                                               add_generation_prompt=True)
    return {"path": path, "exists_there": os.path.isdir(path), "prompt": prompt,
            "node_id": ray.get_runtime_context().get_node_id()}


def _tokenize(ref: str) -> dict:
    import numpy as np
    import ray

    from cm_ray.train.data import tokenize_batch

    msgs = [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola, ¿qué tal?"}]
    out = tokenize_batch({"messages": np.array([msgs], dtype=object), "split": np.array(["train"])}, ref, 64)
    return {"rows": len(out["input_ids"]), "tokens": int(out["n_tokens"][0]),
            "node_id": ray.get_runtime_context().get_node_id()}


def _case_processor(ids: dict, url: str) -> dict:
    from cm_ray.config import load_config
    from cm_ray.generation.generate import build_vllm_processor

    cfg = load_config(REPO / "configs" / "demo.yaml")
    proc = build_vllm_processor(cfg, {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0}, False)
    stage = proc.get_stage_by_name("ChatTemplateStage")
    kwargs = stage.get_dataset_map_batches_kwargs(1, "__data")["fn_constructor_kwargs"]
    chat = _on(ids["gpu_ondemand-0"], _chat_template, stage.fn, kwargs)
    engine = proc.get_stage_by_name("vLLMEngineStage")
    return {"model_source": engine.fn_constructor_kwargs["model"], "chat_template_on_gpu_node": chat,
            "engine_stage_resolves": engine.fn.__qualname__.startswith("resolving("),
            "engine_remote_args": {k: engine.map_batches_kwargs.get(k) for k in ("num_cpus", "num_gpus")},
            "train_tokenizer_on_cpu_node": _on(ids["cpu_spot-0"], _tokenize, cfg.models.generator)}


def _resolve_there(ref: str) -> dict:
    from cm_ray.models import ModelNotFoundError, resolve_model, unreadable

    try:
        return {"resolved": resolve_model(ref)}
    except ModelNotFoundError as e:
        return {"error": str(e), "ref": e.ref, "node": e.node, "record": unreadable(e, "MX", 3)}


def _make_model_dir() -> str:
    from cm_ray.models import cache_root

    d = cache_root() / "models" / "head-only"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _case_unreadable(ids: dict, url: str) -> dict:
    head_path = _on(ids["head"], _make_model_dir)
    got = _on(ids["gpu_ondemand-1"], _resolve_there, head_path)
    return {"head_path": head_path, "head_has_it": "resolved" in _on(ids["head"], _resolve_there, head_path), **got}


def _case_placements(ids: dict, url: str) -> dict:
    import time

    import ray
    from ray.util.placement_group import placement_group

    from cm_ray.cluster import load_cluster_file
    from cm_ray.rehearsal.placement import misplaced, placement_degradation, placements

    @ray.remote(num_gpus=1, num_cpus=1)
    class GpuProbe:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    def cpu_probe():
        return 1

    actor = GpuProbe.remote()
    ray.get(actor.node.remote(), timeout=300)
    pg = placement_group([{"GPU": 1, "CPU": 1}], name="probe-pg")
    ray.get(pg.ready(), timeout=300)
    ray.get(ray.remote(num_cpus=1)(cpu_probe).remote(), timeout=300)
    for _ in range(60):  # task events reach the state API a little after the task ends
        rows = placements(url, REPO / "cluster.yaml")
        if any("cpu_probe" in (r["name"] or "") and r["node_id"] for r in rows):
            break
        time.sleep(1)
    no_gpus = load_cluster_file(REPO / "cluster.yaml")
    for t in no_gpus.node_types:
        t.resources.pop("GPU", None)
    rows_no_gpus = placements(url, no_gpus)
    return {"rows": rows, "misplaced": misplaced(rows), "misplaced_without_gpus": misplaced(rows_no_gpus),
            "record": placement_degradation(rows_no_gpus, "cluster")}


if __name__ == "__main__":
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    result = globals()[f"_case_{sys.argv[1]}"](json.loads(sys.argv[2]), sys.argv[3])
    print(json.dumps(result, default=str))
