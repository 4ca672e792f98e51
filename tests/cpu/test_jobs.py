"""The jobs as users run them: a real Ray head (`ray start --head` on 127.0.0.1), `ray job submit`
of the demo synthesize job, and `serve deploy` of deploy/serve.yaml queried over HTTP.

python -m pytest tests/cpu/test_jobs.py -v
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint):
    """A Ray head started like on a cluster node, in its own process group (stopped by PID only)."""
    temp = Path("/tmp") / f"cmr-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    dash = free_port()
    # Token auth as Ray 2.60 sets it up for a new cluster; head and CLI use ~/.ray/auth_token.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--num-cpus=4", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # Any HTTP answer means the dashboard is up (it may require Ray's auth token: 401).
        _wait(lambda: _get(f"{address}/api/version")[0] in (200, 401, 403), 300, "the Ray dashboard")
        head = {"address": address, "env": env}
        # The jobs API answers a little after the dashboard's HTTP server does.
        _wait(lambda: _ray_cli(head, "job", "list", timeout=60).returncode == 0, 300, "the jobs API")
        yield head
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _ray_cli(head, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env={**head["env"], "RAY_ADDRESS": head["address"]},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_demo_synthesize_job(ray_head, tiny_model_dir, tmp_path):
    root = tmp_path / "artifacts"
    overrides = [f"root={root}", f"models.generator={tiny_model_dir}", "cultures=[GB,MX]",
                 "tasks=[offensive]", "queries.n_specific=1", "queries.n_agnostic=1",
                 "synthesis.prompts_per_pair=1", "synthesis.samples_per_prompt=2",
                 "synthesis.max_new_tokens=96", "synthesis.relevance_filter=none"]
    r = _ray_cli(ray_head, "job", "submit", "--working-dir", ".", "--submission-id",
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
    r2 = _ray_cli(ray_head, "job", "submit", "--working-dir", ".", "--", "python",
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
    r = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", ray_head["address"]],
                       env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(f"{base}/healthz")[0] == 200, 300, "the Serve app to be healthy")
        models = json.loads(_get(f"{base}/v1/models")[1])
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
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", ray_head["address"]],
                       env=ray_head["env"], capture_output=True, timeout=120)
