"""The jobs as users run them: a real Ray head (`ray start --head` on 127.0.0.1), `ray job submit`
of the demo synthesize job, and `serve deploy` of deploy/serve.yaml queried over HTTP.

python -m pytest tests/cpu/test_jobs.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import RayNodes, free_port, http_get, wait_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint):
    """A Ray head started like on a cluster node (``ray start --head``, token auth as Ray 2.60 sets
    it up for a new cluster; head and CLI use ~/.ray/auth_token)."""
    nodes = RayNodes(tmp_path_factory.mktemp("head"))
    try:
        yield nodes.start_head(num_cpus=4)
    finally:
        nodes.stop()


def test_ray_job_submit_runs_the_demo_synthesize_job(ray_head, tiny_model_dir, tmp_path):
    root = tmp_path / "artifacts"
    overrides = [f"root={root}", f"models.generator={tiny_model_dir}", "cultures=[GB,MX]",
                 "tasks=[offensive]", "queries.n_specific=1", "queries.n_agnostic=1",
                 "synthesis.prompts_per_pair=1", "synthesis.samples_per_prompt=2",
                 "synthesis.max_new_tokens=96", "synthesis.relevance_filter=none",
                 # The job path is under test here, not the engine (the vLLM paths have their own
                 # tests); with the demo's vLLM engine on this tiny random model the job did not end.
                 "synthesis.engine=transformers"]
    r = ray_head.cli("job", "submit", "--working-dir", ".", "--submission-id",
                 f"synth-{os.getpid()}", "--", "python", "jobs/synthesize.py",
                 "--config", "configs/demo.yaml", *overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(root))
    for stage in ("queries", "search", "synthesize"):
        assert store.read_manifest(stage)["complete"], stage
    queries = store.read_rows("queries")
    assert {q["culture"] for q in queries} == {"GB", "MX"}
    results = store.read_rows("search", "results")
    assert len(results) == len(queries) and all(r["status"] == "ok" for r in results)
    summary = store.read_json("synth", "summary.json")
    assert set(summary["per_culture"]) == {"GB", "MX"} and summary["partitions"] == 2

    # Idempotent: submitting the same job again skips every stage.
    r2 = ray_head.cli("job", "submit", "--working-dir", ".", "--", "python",
                  "jobs/synthesize.py", "--config", "configs/demo.yaml", *overrides)
    assert r2.returncode == 0 and r2.stdout.count("skipped") >= 3, r2.stdout[-3000:]


@pytest.fixture
def served_root(tmp_path, tiny_model_dir):
    """An artifact root with two tiny adapters and a router trained on a few texts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cm_ray.router.model import Encoder, train_router
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(tmp_path / "served"))
    for i, culture in enumerate(["GB", "MX"]):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        model.save_pretrained(tmp_path / culture)
        store.upload_dir(tmp_path / culture, "adapters", culture)
    texts = {"GB": ["Fancy a cuppa and a biscuit?", "The queue at the post office was long, innit",
                    "Cheers mate, see you at the pub", "It's chucking it down in Manchester"],
             "MX": ["¿Vamos por unos tacos al pastor?", "Feliz Día de Muertos, pon la ofrenda",
                    "Qué padre está la fiesta, güey", "Mañana voy al mercado de Coyoacán"]}
    pairs = [(t, c) for c, ts in texts.items() for t in ts]
    router, _ = train_router(pairs, pairs, Encoder("embedded:all-minilm-l6-v2"))
    router.save(store, "router")
    return store.root


def test_serve_deploy_from_yaml_answers_over_http(ray_head, served_root, tiny_model_dir, tmp_path):
    spec = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    port = free_port()
    spec["http_options"] = {"host": "127.0.0.1", "port": port}
    app = spec["applications"][0]
    app["args"]["overrides"] = [*app["args"]["overrides"], f"root={served_root}",
                                f"models.base={tiny_model_dir}", "serve.max_new_tokens=8"]
    # Serve configs take only remote working_dirs; the head's nodes import cm_ray from the
    # installed package (as the cluster image does), so the run config is named by absolute path.
    app["args"]["config"] = str(REPO / app["args"]["config"])
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", ray_head.address],
                       env=ray_head.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{base}/healthz")[0] == 200, 300, "the Serve app to be healthy")
        models = json.loads(http_get(f"{base}/v1/models")[1])
        assert {"auto", "GB", "MX"} <= {m["id"] for m in models["data"]}
        body = json.dumps({"model": "auto", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "¿Dónde comemos tacos hoy, güey?"}]})
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.loads(resp.read())
        assert out["culture"] == "MX" and out["choices"][0]["message"]["content"] is not None
        bad = urllib.request.Request(f"{base}/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert 400 <= err.value.code < 500
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", ray_head.address],
                       env=ray_head.env, capture_output=True, timeout=120)
