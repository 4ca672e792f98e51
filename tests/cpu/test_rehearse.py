"""``cm-ray rehearse``: the production config, reduced only in size, on a local cluster shaped like
cluster.yaml (0-CPU head, CPU workers, GPU workers declared, each node with private caches), with
loopback providers, pages, S3 and secret store; and a rehearsal that degrades fails naming the
stage and the cultures.

python -m pytest tests/cpu/test_rehearse.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the subprocess has its own limit
SIZES = ["cultures=[MX,CN]", "tasks=[offensive]", "synthesis.prompts_per_pair=2",
         "synthesis.samples_per_prompt=3", "evaluate.max_questions=2", "evaluate.bootstrap=0", "train.max_steps=2"]


def _rehearse(tmp_path, *args, timeout=1500):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in [k for k in env if k.startswith("AWS_")]:  # the rehearsal brings its own S3
        env.pop(k)
    r = subprocess.run([sys.executable, "-m", "cm_ray", "rehearse", *args, "--workdir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    rep = json.loads((tmp_path / "rehearsal.json").read_text()) if (tmp_path / "rehearsal.json").exists() else None
    return r, rep


def test_a_reduced_paper_rehearsal_on_cluster_yaml_passes(tmp_path):
    r, rep = _rehearse(tmp_path, "configs/paper.yaml", *SIZES, "--cluster", "cluster.yaml")
    assert rep is not None, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.returncode == 0 and rep["passed"], json.dumps(rep["failures"], indent=1) + r.stderr[-3000:]
    assert "rehearsal passed" in r.stdout
    # The config's branches ran: 2 GPU workers per trial, the vLLM engine served every answer.
    stand = {s["what"] for s in rep["stand_ins"]}
    assert {"models.generator", "root", "train.backend", "serve.port"} <= stand
    assert not stand & {"train.num_workers", "serve.engine", "queries.n_specific", "search.fetch.enabled"}
    nodes = {n["node_type"]: n["resources"] for n in rep["nodes"]}
    assert nodes["head"].get("CPU") == 0 and nodes["gpu_ondemand"]["GPU"] == 1
    # What asks for a GPU ran on the GPU nodes with one GPU each: the vLLM engine of synthesis, the
    # train workers, the vLLM server replica, the evaluation actors; nothing GPU-bound on the head.
    for stage, actor in [("synthesize", "vLLMEngineStageUDF"), ("train", "RayTrainWorker"),
                         ("serve", "VLLMServer"), ("evaluate", "EvalWorker")]:
        found = [p for p in rep["placements"][stage] if actor in p["name"]]
        assert found and all(p["node_type"] == "gpu_ondemand" and p["requested"].get("GPU") == 1
                             for p in found), (stage, found)
    placed = [p for rows in rep["placements"].values() for p in rows]
    assert all(p["ok"] for p in placed)
    assert not [p for p in placed if p["node_type"] == "head" and p["requested"].get("GPU")]
    assert rep["served"] and {s["engine"] for s in rep["served"]} == {"vllm"}
    assert set(rep["stages"]["search"]["per_culture"]) == {"MX", "CN"}
    assert (tmp_path / "rehearsal.md").read_text().startswith("# Rehearsal: configs/paper.yaml")


def test_a_rehearsal_fails_loudly_naming_the_cultures_when_searches_fall_back_and_prompts_overflow(tmp_path):
    # searxng down: every search is answered by the bm25 fallback; a context that cannot hold the
    # synthesis prompt next to its 1024 new tokens: every prompt is over the limit (rows rejected).
    # Template queries only (the LLM's queries are the passing rehearsal's business): one vLLM
    # engine fewer to start.
    code = ("import json, sys; from cm_ray.rehearsal.run import rehearse; "
            "c, rep = rehearse('configs/paper.yaml', 'cluster.yaml', json.loads(sys.argv[1]), "
            "stages=('synthesize',), workdir=sys.argv[2], web_down=('searxng',), "
            "unchecked=['synthesis.vllm.max_model_len=1200', 'queries.llm=false']); "
            "from cm_ray.rehearsal.report import summary_line; print(summary_line(rep)); sys.exit(c)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(SIZES), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    rep = json.loads((tmp_path / "rehearsal.json").read_text())
    assert r.returncode == 1 and not rep["passed"], r.stderr[-3000:]
    fallback = [f for f in rep["failures"] if "search_fallback" in f["what"]]
    assert {c for f in fallback for c in f["cultures"]} == {"MX", "CN"}, rep["failures"]
    overflow = [f for f in rep["failures"] if "prompt_over_limit" in f["what"]]
    assert {c for f in overflow for c in f["cultures"]} == {"MX", "CN"}, rep["failures"]
    assert rep["unchecked_overrides"] == ["synthesis.vllm.max_model_len=1200", "queries.llm=false"]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("rehearsal FAILED") and "MX" in line and "CN" in line and "search" in line
