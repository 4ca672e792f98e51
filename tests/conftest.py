"""Shared fixtures: a real local Ray cluster, a real S3 server (moto) on 127.0.0.1, tiny models.

python -m pytest tests/cpu -q
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    from cm_ray.rehearsal.cluster import LocalCluster, NodeSpec, free_port, wait_for  # noqa: F401 (fixtures')
except ImportError:  # a GPU host with only torch/transformers/peft (tests/gpu): no cluster fixtures
    LocalCluster = NodeSpec = free_port = wait_for = None

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CM_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public evaluation data beside the project; tests that need it skip without it."""
    if not SHARED_DATA.exists():
        pytest.skip(f"public evaluation data not found at {SHARED_DATA} (set CM_RAY_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto, server mode) on 127.0.0.1; sets the AWS_* env vars."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_root(s3_endpoint, request):
    """A fresh ``s3://bucket/prefix`` root for one test."""
    import re
    import uuid

    from cm_ray.storage import ensure_bucket

    bucket = "cm-ray-test"
    ensure_bucket(f"s3://{bucket}")
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40]
    return f"s3://{bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray cluster for the session (4 logical CPUs on 2 cores; see ray_utils)."""
    import ray

    from cm_ray.ray_utils import init_ray

    init_ray(None, num_cpus=4, dashboard_port=free_port())
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class RayNodes(LocalCluster or object):
    """A Ray cluster started with ``ray start`` on 127.0.0.1 as on cluster nodes: a head with the
    dashboard and jobs API, and worker nodes that may declare GPUs (Ray takes declared resources
    at face value, so a GPU node is simulated on a CPU machine; the work runs on CPU underneath).
    Each node is its own process group, stopped by PID only. The nodes share this machine's
    filesystem (``cm_ray.rehearsal.cluster.LocalCluster`` gives each its own caches);
    ``address`` is the dashboard URL, ``gcs`` the GCS address."""

    BIN = Path(sys.executable).parent

    def __init__(self, log_dir: Path, env: dict | None = None):
        super().__init__([], log_dir, env=env, private=False)
        self.log_dir = log_dir

    def start_head(self, num_cpus: int = 4, num_gpus: int = 0) -> "RayNodes":
        super().start_head(NodeSpec("head", "head", {"CPU": num_cpus, "GPU": num_gpus}, True, None))
        self.address = self.dashboard_url
        return self

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> None:
        n = len(self.procs)
        super().add_node(NodeSpec(f"node{n}", f"node{n}", {"CPU": num_cpus, "GPU": num_gpus}, False, None))

    def alive_nodes(self) -> int:
        return len(self.list_nodes())


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors and cached."""
    from cm_ray.models import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (fast to train and serve)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def python() -> str:
    return sys.executable


class LoopbackServer:
    """An aiohttp server on 127.0.0.1, in its own thread and loop, answering one route.

    Subclasses set ``METHOD``/``PATH`` (and ``URL_SUFFIX``, what ``url`` ends with) and implement
    ``async def handle(self, request)``, or override ``routes`` for several routes. ``base`` is
    the server's ``http://127.0.0.1:<port>``.
    """

    METHOD, PATH, URL_SUFFIX = "POST", "/v1/chat/completions", "/v1"

    def routes(self) -> list[tuple[str, str, object]]:
        """(method, path, handler) of every route."""
        return [(self.METHOD, self.PATH, self.handle)]

    def __init__(self):
        import asyncio
        import threading

        from aiohttp import web

        app = web.Application()
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(web), self.loop).result()

    async def _start(self, web):
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.url = self.base + self.URL_SUFFIX

    async def handle(self, request):
        raise NotImplementedError

    def close(self):
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


class LoopbackChatServer(LoopbackServer):
    """An OpenAI-compatible chat-completions server; ``url`` is the ``/v1`` base URL."""


def serve_app(cfg, name: str, port: int):
    """Deploy the Serve app for ``cfg`` on 127.0.0.1:``port`` and wait for /healthz; a generator
    for module fixtures: yields the base URL, then deletes the app (and Serve when it was the last)."""
    import time

    import requests
    from ray import serve

    from cm_ray.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    yield base
    serve.delete(name)
    if not serve.status().applications:  # the next module starts Serve on a port of its own
        serve.shutdown()


def assert_synth_contract(store) -> int:
    """Every synth partition in ``store`` has exactly the contract's columns and Arrow schema and
    passes its row validation; returns the rows checked."""
    import pyarrow.parquet as pq

    from cm_ray.artifacts import SYNTH_COLUMNS, synth_files, synth_schema, validate_synth_rows

    n = 0
    for path in synth_files(store):
        with store.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        assert table.column_names == list(SYNTH_COLUMNS) and table.schema.equals(synth_schema()), path
        validate_synth_rows(table.to_pylist())
        n += table.num_rows
    return n
