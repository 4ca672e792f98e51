"""Overload over real HTTP on 127.0.0.1: bounded queues and a deployment-side request timeout.

One adapter-server replica that takes one request at a time (max_ongoing_requests=1) with one
queued request (max_queued_requests=1): capacity 2. Under about 4x that, the excess gets 503 +
Retry-After at once and every answer arrives within serve.generation_timeout_s; a request that
runs past that timeout gets 503 + Retry-After instead of holding its client.

python -m pytest tests/cpu/test_serve_overload.py -q -x
"""

import concurrent.futures as cf
import time
from pathlib import Path

import pytest
import requests

from cm_ray.config import load_config
from tests.conftest import free_port, serve_app

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S, RETRY_AFTER_S = 1.5, 2  # 2000 tiny-model tokens take >= 3.5 s on 2 idle cores


def test_both_deployments_get_queue_bounds_and_retry_after_from_the_config():
    from cm_ray.config import ConfigError
    from cm_ray.serve.app import adapter_server_options, ingress_options

    s = load_config(REPO / "configs" / "demo.yaml", [
        "serve.max_queued_requests=3", "serve.ingress_max_queued_requests=7",
        "serve.ingress_max_ongoing_requests=9", "serve.retry_after_s=2.5"]).serve
    a, i = adapter_server_options(s), ingress_options(s)
    assert (a["max_ongoing_requests"], a["max_queued_requests"]) == (s.max_ongoing_requests, 3)
    assert (i["max_ongoing_requests"], i["max_queued_requests"]) == (9, 7)
    for opts in (a, i):
        assert (opts["backpressure_config"].status_code, opts["backpressure_config"].retry_after_s) \
            == (503, 2.5)
    for bad, field in (("serve.max_queued_requests=0", "serve.max_queued_requests"),
                       ("serve.generation_timeout_s=0", "serve.generation_timeout_s"),
                       ("serve.max_body_bytes=10", "serve.max_body_bytes"),
                       ("serve.max_messages=0", "serve.max_messages")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(REPO / "configs" / "demo.yaml", [bad])


@pytest.fixture(scope="module")
def url(ray_local, tiny_model_dir, tmp_path_factory):
    port = free_port()
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={tmp_path_factory.mktemp('overload-root')}", f"models.base={tiny_model_dir}",
        "router.kind=header", f"serve.port={port}", "serve.max_batch_size=1",
        "serve.max_ongoing_requests=1", "serve.max_queued_requests=1",
        f"serve.retry_after_s={RETRY_AFTER_S}", f"serve.generation_timeout_s={TIMEOUT_S}",
        "serve.max_new_tokens=2000", "serve.ray_actor_cpus=0.5"])
    yield from serve_app(cfg, "cm_ray_overload", port)


def ask(url, max_tokens):
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "base", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
    return r, time.perf_counter() - t0


def wait_until_served(url, within_s=60):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ask(url, 2)[0].status_code == 200:
            return
        time.sleep(0.5)
    pytest.fail("the app did not serve a short request again")


def test_excess_requests_get_503_with_retry_after_and_accepted_ones_finish_in_bounded_time(url):
    wait_until_served(url)
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: ask(url, 24), range(8)))
    by_status = {}
    for r, elapsed in results:
        by_status.setdefault(r.status_code, []).append((r, elapsed))
        assert r.status_code in (200, 429, 503), r.text
        assert elapsed < TIMEOUT_S + 5, (r.status_code, elapsed)  # never unbounded latency
        if r.status_code != 200:
            assert int(r.headers["Retry-After"]) >= RETRY_AFTER_S, r.headers  # the drain estimate
            assert r.json()["error"]["type"] in ("overloaded_error", "timeout_error"), r.text
    assert by_status.get(200), f"no request was served: {[(r.status_code, r.text) for r, _ in results]}"
    overloaded = [r for r, _ in results if r.status_code != 200
                  and r.json()["error"]["type"] == "overloaded_error"]
    assert overloaded, "8 requests at a capacity of 2: some must be refused at once"
    assert all("serve.max_queued_requests" in r.json()["error"]["message"] for r in overloaded)
    wait_until_served(url)


def test_a_request_past_the_deployment_timeout_gets_503_with_retry_after(url):
    wait_until_served(url)
    r, elapsed = ask(url, 2000)  # 2000 greedy tokens: more than twice the timeout
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= RETRY_AFTER_S
    err = r.json()["error"]
    assert err["type"] == "timeout_error" and "serve.generation_timeout_s" in err["message"]
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 5, elapsed
    wait_until_served(url)  # the replica recovers; a valid request is served again


def test_retry_after_is_the_backlogs_drain_estimate_never_below_the_configured_floor():
    """Requests in flight over the recent answer rate (clock injected): 4 answers in 2 s = 1.5/s
    (3 intervals), 9 in flight drain in 6 s; with nothing measured yet, serve.retry_after_s."""
    from types import SimpleNamespace

    from cm_ray.serve.limits import DrainEstimate, timeout_error

    now = [100.0]
    d = DrainEstimate(SimpleNamespace(retry_after_s=1.0), clock=lambda: now[0])
    assert d.retry_after_s() == 1.0
    for _ in range(13):
        d.started()
    for t in (100.0, 100.5, 101.5, 102.0):
        now[0] = t
        d.finished()
    assert d.inflight == 9 and d.retry_after_s() == pytest.approx(6.0)
    s = SimpleNamespace(generation_timeout_s=5.0, retry_after_s=1.0)
    assert timeout_error(s, d.retry_after_s()).headers["Retry-After"] == "6"
    for _ in range(9):
        d.finished()  # the backlog drained
    assert d.retry_after_s() == 1.0
