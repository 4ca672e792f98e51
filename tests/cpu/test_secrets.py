"""Secrets never in stored rows, logs, manifests, error messages or Ray's metadata.

Unit part: the one scrub (``cm_ray.http.scrub``), the worker environment (a URL's embedded
credentials dropped), the ``Secrets`` handle. A task on a real local Ray cluster with our
runtime_env while AWS_ENDPOINT_URL holds ``key:secret@``: the worker sees the bare endpoint.
Stage part: the queries stage (OpenAI-compatible engine) and the search stage (Brave, an API key)
run on a real local Ray cluster against loopback servers that echo the request headers, with
known key strings set only in the driver after Ray started; then the keys must appear nowhere
under the artifact root (every file, bytes), nowhere in the cluster's session logs and nowhere
in Ray's state API (actors, tasks, jobs, workers, objects, with detail: runtime_env included).
Job part: the same stages through a real ``ray job submit`` to a ``ray start --head`` cluster.

python -m pytest tests/cpu/test_secrets.py -v
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
import uuid
from pathlib import Path

import pytest

from cm_ray.http import error_text, scrub
from cm_ray.ray_utils import Secrets, SecretsHandle, is_secret_name, worker_env
from tests.conftest import LoopbackChatServer, LoopbackServer

OPENAI_VAR = "CM_RAY_LEAK_OPENAI_KEY"
SECRET_ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "BRAVE_API_KEY",
                    "SERPER_API_KEY", "TAVILY_API_KEY", "YDC_API_KEY", "OPENAI_API_KEY", OPENAI_VAR)


# ---------------------------------------------------------------------------------------------
# Unit: scrub, worker_env, Secrets.

def test_scrub_removes_every_spelling_of_a_key_and_local_and_store_paths():
    key = "sk-A/b+c=d"
    text = (f"echo Bearer {key} {json.dumps(key)} sk-A%2Fb%2Bc%3Dd sk-A%2Fb%2Bc%3Dd "
            "open('/home/u/run/x.parquet') s3://bucket/root/synth ~/.cache/m /tmp/ray/session_1/logs "
            "kept: http://127.0.0.1:8080/tmp/a https://example.org/home/b /v1/chat/completions")
    out = scrub(text, [key, None, ""])
    assert "sk-A" not in out and out.count("***") == 4
    assert "/home/u" not in out and "s3://" not in out and ".cache" not in out and "/tmp/ray" not in out
    assert out.count("<path>") == 4
    assert "http://127.0.0.1:8080/tmp/a https://example.org/home/b /v1/chat/completions" in out
    assert scrub(f"see /work/x {key}", [key], paths=False) == "see /work/x ***"


def test_error_text_scrubs_exception_messages_and_reprs():
    e = FileNotFoundError(2, "No such file or directory", "/root/.cache/cm_ray/key-abc.json")
    assert error_text(e, ["key-abc"]) == "FileNotFoundError: [Errno 2] No such file or directory: '<path>'"
    assert error_text(KeyError("tok-1"), ["tok-1"]) == "KeyError: '***'"
    assert error_text(RuntimeError()) == "RuntimeError"


def test_worker_env_forwards_settings_but_never_a_credential(monkeypatch):
    for name in SECRET_ENV_NAMES:
        monkeypatch.setenv(name, f"value-of-{name}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert not [k for k in env if is_secret_name(k)]
    assert not [v for v in env.values() if v.startswith("value-of-")]


def test_worker_env_drops_credentials_embedded_in_a_url(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIAEXAMPLE:wJalr-s3cr%40t@minio.internal:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org/path")
    with caplog.at_level("WARNING", logger="cm_ray.ray_utils"):
        env = worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio.internal:9000"
    assert env["AWS_ENDPOINT_URL_S3"] == "https://s3.example.org/path"
    assert "AWS_ENDPOINT_URL has credentials" in caplog.text
    assert "AKIAEXAMPLE" not in caplog.text + repr(env) and "s3cr" not in caplog.text + repr(env)


def test_secrets_print_as_names_and_fall_back_to_the_worker_environment(monkeypatch):
    monkeypatch.setenv("CM_RAY_OWN_KEY", "own-123")
    s = Secrets({"BRAVE_API_KEY": "brave-xyz", "EMPTY": ""})
    assert s.get("BRAVE_API_KEY") == "brave-xyz" and s.get("CM_RAY_OWN_KEY") == "own-123"
    assert s.get("EMPTY") is None and s.get(None) is None and s.values() == ["brave-xyz"]
    for shown in (repr(s), str(s), repr([s]), f"{s}", repr(SecretsHandle(object()))):
        assert "brave-xyz" not in shown
    assert pickle.loads(pickle.dumps(s)).get("BRAVE_API_KEY") == "brave-xyz"


def test_providers_read_the_key_from_the_secrets_handed_over():
    from cm_ray.data.providers import make_provider

    p = make_provider("brave", "http://127.0.0.1:1/", secrets=Secrets({"BRAVE_API_KEY": "b-1"}))
    assert p.request("q", "MX", "es-MX", 3)["headers"]["X-Subscription-Token"] == "b-1"


# ---------------------------------------------------------------------------------------------
# Loopback servers that echo what they were sent.

# An echoed key straddles the cut of the quoted error body (300 chars for the engine, 160 for
# search): code that scrubs after cutting leaves a prefix of the key, which the needles catch.


class EchoLLM(LoopbackChatServer):
    """Task-specific query prompts get a 401 page echoing the headers; the others a 200 whose
    queries echo the Authorization header."""

    def __init__(self):
        self.auth: list[str] = []
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        auth = request.headers.get("Authorization", "")
        self.auth.append(auth)
        user = body["messages"][-1]["content"]
        if "bears on this task" in user:
            return web.Response(status=401, text=f"{'x' * 280}{auth} {dict(request.headers)}")
        text = json.dumps({"queries": [f"family life with {auth}", "family dinners and elders",
                                       f"token {auth.split()[-1]} for you"]})
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 5}})


class EchoBrave(LoopbackServer):
    """A Brave-speaking server: every other query gets a 401 echoing its headers."""

    METHOD, PATH = "GET", "/res/v1/web/search"
    URL_SUFFIX = PATH

    def __init__(self):
        self.tokens: list[str] = []
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        self.tokens.append(request.headers.get("X-Subscription-Token", ""))
        if len(self.tokens) % 2:
            token = request.headers.get("X-Subscription-Token", "")
            return web.Response(status=401, text=f"{'x' * 150}{token} {dict(request.headers)}")
        q = request.query["q"]
        return web.json_response({"web": {"results": [
            {"title": q, "url": "https://example.org/r", "description": "a result"}]}})


@pytest.fixture
def echo_servers():
    llm, brave = EchoLLM(), EchoBrave()
    yield llm, brave
    llm.close()
    brave.close()


def _overrides(root, llm, brave) -> list[str]:
    return [f"root={root}", "cultures=[GB,MX]", "tasks=[offensive]", "queries.n_specific=2",
            "queries.n_agnostic=2", "synthesis.engine=openai", f"synthesis.openai.base_url={llm.url}",
            "synthesis.openai.model=fake", f"synthesis.openai.api_key_env={OPENAI_VAR}",
            "synthesis.openai.max_retries=0", "search.provider=brave", f"search.endpoint={brave.url}",
            "search.max_retries=0", "search.cache=false",
            "checks.fail=false"]  # the echo servers refuse some calls on purpose: report, do not fail


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n[:8]!r}..." for n in needles if n in data]
    return hits


def _check_stage_outputs(store, llm, brave, keys: dict[str, str]) -> None:
    """The servers got the keys (they did travel), and the echoes were scrubbed where they landed."""
    assert llm.auth and all(a == f"Bearer {keys[OPENAI_VAR]}" for a in llm.auth), llm.auth[:2]
    assert brave.tokens and all(t == keys["BRAVE_API_KEY"] for t in brave.tokens)
    rows = store.read_rows("search", "results")
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and len(failed) < len(rows)
    assert all(r["error"].startswith("brave: HTTP 401: x") for r in failed)
    assert any("***" in r["error"] for r in failed)  # the echoed token, cut at 160 chars or not
    queries = store.read_rows("queries")
    assert any("Bearer ***" in q["query"] for q in queries if q["source"] == "llm"), \
        [q["query"] for q in queries]


def _ray_state_text() -> str:
    import ray
    from ray.util import state

    address = ray.get_runtime_context().gcs_address  # this cluster's (others may run beside it)
    parts = []
    for fn in (state.list_actors, state.list_tasks, state.list_jobs, state.list_workers,
               state.list_objects, state.list_placement_groups, state.list_nodes):
        parts += [repr(x) for x in fn(address=address, detail=True, limit=10000, raise_on_missing_output=False)]
    return "\n".join(parts)


def test_keys_appear_nowhere_after_the_queries_and_search_stages_on_ray(ray_local, echo_servers, tmp_path,
                                                                        monkeypatch):
    import ray

    from cm_ray.config import load_config
    from cm_ray.generation.generate import generate
    from cm_ray.stages import run_stage
    from cm_ray.storage import ArtifactStore

    llm, brave = echo_servers
    tag = uuid.uuid4().hex
    keys = {OPENAI_VAR: f"sk-{tag}", "BRAVE_API_KEY": f"brv{tag[::-1]}"}  # random from char 4 on
    for k, v in keys.items():  # set after Ray started: only the driver has them
        monkeypatch.setenv(k, v)
    cfg = load_config(None, _overrides(tmp_path / "run", llm, brave))
    store = ArtifactStore(cfg.root)
    summaries = [run_stage("queries", cfg, store), run_stage("search", cfg, store)]
    # The generation rows with their gen_error column, stored as a consumer of generate() keeps them.
    gen = generate(ray.data.from_items([{"messages": [{"role": "user", "content": "x bears on this task"}]},
                                        {"messages": [{"role": "user", "content": "y"}]}]),
                   cfg, max_new_tokens=8, temperature=0.0).take_all()
    assert sorted(r["finish_reason"] for r in gen) == ["error", "stop"]
    err = next(r["gen_error"] for r in gen if r["finish_reason"] == "error")
    assert err.startswith("HTTP 401: x") and "***" in err
    store.write_table([{"gen_error": r["gen_error"], "text": r["generated_text"]} for r in gen],
                      "leakcheck", "gen.parquet")
    _check_stage_outputs(store, llm, brave, keys)
    assert not [v for v in keys.values() if v[:10] in json.dumps(summaries, default=str)]

    needles = [v[:n].encode() for v in keys.values() for n in (len(v), 10)]
    assert not _files_with(tmp_path, needles)
    time.sleep(2)  # let the workers' log lines reach the files
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = _files_with(session / "logs", needles)
    assert not logs, logs
    text = _ray_state_text()
    assert "AsyncGeneratorUDF" in text or "MapWorker" in text  # the state API did list our actors
    assert not [v for v in keys.values() if v[:10] in text]
    assert not re.search(r"(BRAVE_API_KEY|" + OPENAI_VAR + ")['\"]?:", text), "a credential variable in a runtime_env"
    # AWS_* names are not checked on this shared cluster: Ray Tune copies the driver's AWS_*
    # variables into the runtime_env of its trial actors (ray/tune/execution/class_cache.py), which
    # the actors and tasks they start inherit, and an earlier train test may have left them here.


def test_endpoint_credentials_never_reach_a_workers_runtime_env_and_the_bare_endpoint_works(
        ray_local, s3_endpoint, s3_root, monkeypatch, caplog):
    """On a real local Ray: a task started with our ``runtime_env`` (``worker_env``) while the
    driver's AWS_ENDPOINT_URL holds ``key:secret@`` sees the bare endpoint, its runtime_env and
    Ray's state API hold no part of the credential, and it can still use S3 with it (its keys
    come from the node's environment, as boto3 and pyarrow expect)."""
    import ray

    tag = uuid.uuid4().hex
    user, password = f"AKIA{tag[:12].upper()}", f"pw{tag[::-1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.replace("://", f"://{user}:{password}@"))
    with caplog.at_level("WARNING", logger="cm_ray.ray_utils"):
        env = worker_env()
    assert password not in caplog.text and user not in caplog.text

    @ray.remote(num_cpus=0.01)
    def probe(root: str):
        import os

        import ray

        from cm_ray.storage import ArtifactStore

        store = ArtifactStore(root)
        store.write_table([{"a": 1}], "probe", "x.parquet")
        return (os.environ.get("AWS_ENDPOINT_URL"), ray.get_runtime_context().runtime_env,
                store.read_rows("probe", "x.parquet"))

    url, runtime_env, rows = ray.get(probe.options(runtime_env={"env_vars": env}).remote(s3_root))
    assert url == s3_endpoint and rows == [{"a": 1}]
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == s3_endpoint
    shown = json.dumps(runtime_env) + _ray_state_text()
    assert s3_endpoint in shown  # the state API did show the runtime_env
    assert password not in shown and user not in shown


# ---------------------------------------------------------------------------------------------
# The same through `ray job submit` on a `ray start --head` cluster: keys in the head node's
# environment (as a cluster node has them), never in the job's runtime_env.

from tests.cpu.test_jobs import ray_head  # noqa: E402,F401  (ray_head: the fixture)

JOB_TAG = uuid.uuid4().hex
# Random from the 4th char on: a 10-char prefix needle never matches this file's own text
# (the job's working_dir copy of it lies under the head's temp dir).
JOB_KEYS = {OPENAI_VAR: f"sk-{JOB_TAG}", "BRAVE_API_KEY": f"brv{JOB_TAG[::-1]}"}


@pytest.fixture(scope="module")
def keyed_head(request):
    """``ray_head`` started with the keys in its environment (restored after the module)."""
    old = {k: os.environ.get(k) for k in JOB_KEYS}
    os.environ.update(JOB_KEYS)
    try:
        yield request.getfixturevalue("ray_head")
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_keys_appear_nowhere_after_a_ray_job_submit(keyed_head, echo_servers, tmp_path):
    from cm_ray.storage import ArtifactStore

    llm, brave = echo_servers
    root = tmp_path / "run"
    code = ("import sys; from cm_ray.config import load_config; from cm_ray.stages import run_stage; "
            "from cm_ray.storage import ArtifactStore; cfg = load_config(None, sys.argv[1:]); "
            "s = ArtifactStore(cfg.root); [print(run_stage(n, cfg, s)['headline']) for n in ('queries', 'search')]")
    sid = f"secrets-{os.getpid()}-{JOB_TAG[:6]}"
    r = keyed_head.cli("job", "submit", "--working-dir", ".", "--submission-id", sid, "--",
                 "python", "-c", code, *_overrides(root, llm, brave))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_stage_outputs(ArtifactStore(str(root)), llm, brave, JOB_KEYS)
    needles = [v[:n].encode() for v in JOB_KEYS.values() for n in (len(v), 10)]
    assert not _files_with(tmp_path, needles)
    time.sleep(2)
    shown = r.stdout + r.stderr
    for args in (("job", "logs", sid), ("job", "list"), ("list", "actors", "--detail", "--limit", "10000"),
                 ("list", "tasks", "--detail", "--limit", "10000"), ("list", "jobs", "--detail")):
        out = keyed_head.cli(*args, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        shown += out.stdout
    assert "queries" in shown and sid in shown
    assert not [v for v in JOB_KEYS.values() if v[:10] in shown]
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|BRAVE_API_KEY|" + OPENAI_VAR + ")['\"]?:",
                         shown)
    assert keyed_head.temp.is_dir()
    logs = _files_with(keyed_head.temp, needles)  # the head's --temp-dir
    assert not logs, logs
