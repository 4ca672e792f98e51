"""Search stage throughput and robustness against a loopback provider with a hard rate limit.

A SearXNG-speaking aiohttp server (own process, 127.0.0.1) answers after 50 ms and enforces
200 requests/s itself (token bucket, burst 20): over-limit requests get 429 and are counted.
The stage runs 2,000 queries with 2 actors and search.qps=200, three times (four with the
baseline):

  0. clean, strict    -> the same clean run with a strict capacity-1 bucket (tolerance 0: every
                         late grant pushes the schedule back), as a side-by-side baseline:
                         ``qps_ratio_strict``, ``over_limit_429_strict`` (skip: --no-baseline)
  1. clean            -> achieved qps / limit (measured at the server), p50/p99 latency, 429s,
                         with the shared GCRA bucket (a late grant keeps its slot within half a
                         slot)
  2. 20% faults       -> 429+Retry-After, 500, timeouts, invalid JSON, truncated bodies (4% each);
                         rows counted by query id (``count_by_identity``: lost = ids in but not
                         out, duplicated = ids out more than once, unexpected = ids never in),
                         and queries failed
  3. forced rerun of 2 -> provider calls the server sees (cache)

python bench/search.py --queries 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LATENCY_S, LIMIT_QPS, BURST = 0.05, 200.0, 20
FAULTS = ["429", "500", "timeout", "badjson", "truncated"]


def serve(port: int, ready) -> None:
    from aiohttp import web

    state = {"fault_rate": 0.0, "ok": 0, "over_limit": 0, "faults": 0, "calls": 0,
             "first_ok": None, "last_ok": None, "tokens": BURST, "t": time.monotonic()}
    rng = random.Random(0)

    def take_token() -> bool:
        now = time.monotonic()
        state["tokens"] = min(BURST, state["tokens"] + (now - state["t"]) * LIMIT_QPS)
        state["t"] = now
        if state["tokens"] >= 1:
            state["tokens"] -= 1
            return True
        return False

    async def search(request):
        state["calls"] += 1
        if not take_token():
            state["over_limit"] += 1
            return web.Response(status=429, headers={"Retry-After": "0.1"}, text="rate limited")
        await asyncio.sleep(LATENCY_S)
        q = request.query["q"]
        if rng.random() < state["fault_rate"]:
            state["faults"] += 1
            kind = rng.choice(FAULTS)
            if kind == "429":
                return web.Response(status=429, headers={"Retry-After": "0.2"}, text="slow down")
            if kind == "500":
                return web.Response(status=500, text="internal error")
            if kind == "timeout":
                await asyncio.sleep(3)
            if kind == "badjson":
                return web.Response(text='{"results": [oops', content_type="application/json")
            if kind == "truncated":
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                resp.content_length = 5000
                await resp.prepare(request)
                await resp.write(b'{"results": [{"title": "cut')
                request.transport.close()
                return resp
        now = time.monotonic()
        state["ok"] += 1
        state["first_ok"] = state["first_ok"] or now
        state["last_ok"] = now
        return web.json_response({"query": q, "results": [
            {"title": f"{q} #{i}", "url": f"https://example.org/{abs(hash(q)) % 10**8}/{i}",
             "content": f"snippet {i} about {q}"} for i in range(5)]})

    async def control(request):
        if request.method == "POST":
            body = await request.json()
            state.update(fault_rate=body.get("fault_rate", 0.0), ok=0, over_limit=0, faults=0,
                         calls=0, first_ok=None, last_ok=None)
        return web.json_response({k: v for k, v in state.items() if k not in ("t", "tokens")})

    app = web.Application()
    app.router.add_get("/search", search)
    app.router.add_route("*", "/control", control)
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def control(port: int, **body) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/control", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def count_by_identity(ids_in, ids_out) -> dict:
    """Every query id in must come out as exactly one row. Counted from the ids, so a missing row
    and a duplicated one cannot cancel out: ``lost`` (ids in, not out), ``duplicated`` (ids out
    more than once), ``unexpected`` (ids out that never went in), with a few examples of each."""
    from collections import Counter

    sent, got = Counter(ids_in), Counter(ids_out)
    if any(c > 1 for c in sent.values()):
        raise ValueError("query ids in are not unique: " + ", ".join(sorted(i for i, c in sent.items() if c > 1)[:5]))
    lost = sorted(set(sent) - set(got))
    dup = sorted(i for i, c in got.items() if c > 1 and i in sent)
    unexpected = sorted(set(got) - set(sent))
    return {"lost": len(lost), "duplicated": len(dup), "unexpected": len(unexpected),
            "rows_in": sum(sent.values()), "rows_out": sum(got.values()),
            "examples": {"lost": lost[:5], "duplicated": dup[:5], "unexpected": unexpected[:5]}}


def write_queries(store, n: int, tag: str) -> None:
    cultures = [("GB", "en-GB"), ("CN", "zh-CN"), ("MX", "es-MX"), ("US", "en-US")]
    per = -(-n // len(cultures))
    for c, loc in cultures:
        rows = [{"query_id": f"{tag}-{c}-{i}", "culture": c, "task": "offensive", "kind": "specific",
                 "query": f"{tag} query {i} about {c}", "locale": loc} for i in range(per)]
        store.write_table(rows, "queries", f"culture={c}", "part-0.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the strict-bucket run")
    args = parser.parse_args()

    from cm_ray.config import load_config
    from cm_ray.data.search import run_search
    from cm_ray.ray_utils import init_ray
    from cm_ray.storage import ArtifactStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait(30)
    for _ in range(100):
        try:
            control(port)
            break
        except OSError:
            time.sleep(0.1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    base = ["search.provider=searxng", f"search.endpoint=http://127.0.0.1:{port}/search",
            f"search.qps={LIMIT_QPS}", "search.concurrency=2", "search.max_in_flight=32",
            "search.batch_size=32", "search.timeout_s=1.0", "search.max_retries=6",
            "search.backoff_base_s=0.05", "search.backoff_max_s=1.0", "cultures=[GB, CN, MX, US]"]
    init_ray(load_config(None, base), include_dashboard=False)
    out: dict = {"load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        if not args.no_baseline:
            # 0. the baseline: the stage's bucket actor made beforehand with tolerance 0 (the
            # stage reuses the named actor), then removed so run 1 gets the default one.
            import ray

            from cm_ray.http import TokenBucket

            strict = ray.remote(TokenBucket).options(
                name="search_rate_searxng", namespace="cm_ray", get_if_exists=True, num_cpus=0,
                max_concurrency=1000).remote(LIMIT_QPS, tolerance=0.0)
            cfg = load_config(None, [*base, f"root={tmp / 'strict'}"])
            store = ArtifactStore(cfg.root)
            write_queries(store, args.queries, "strict")
            control(port, fault_rate=0.0)
            run_search(cfg, store)
            st = control(port)
            qps0 = (st["ok"] - 1) / (st["last_ok"] - st["first_ok"])
            out.update(qps_ratio_strict=round(qps0 / LIMIT_QPS, 3), over_limit_429_strict=st["over_limit"])
            ray.kill(strict)
            time.sleep(1)

        # 1. clean run
        cfg = load_config(None, [*base, f"root={tmp / 'clean'}"])
        store = ArtifactStore(cfg.root)
        write_queries(store, args.queries, "clean")
        control(port, fault_rate=0.0)
        t0 = time.time()
        s1 = run_search(cfg, store)
        wall1 = time.time() - t0
        st = control(port)
        qps = (st["ok"] - 1) / (st["last_ok"] - st["first_ok"])
        rows = store.read_rows("search", "results")
        clean = count_by_identity([r["query_id"] for r in store.read_rows("queries")], [r["query_id"] for r in rows])
        lat = sorted(r["latency_ms"] for r in rows if r["status"] == "ok")
        out.update(qps=round(qps, 1), qps_ratio=round(qps / LIMIT_QPS, 3),
                   p50_ms=round(statistics.median(lat), 1),
                   p99_ms=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                   over_limit_429=st["over_limit"], clean_wall_s=round(wall1, 1),
                   clean_calls=st["calls"], clean_ok=s1["ok"], clean_lost=clean["lost"],
                   clean_duplicated=clean["duplicated"], clean_unexpected=clean["unexpected"])

        # 2. with 20% injected faults
        cfg = load_config(None, [*base, f"root={tmp / 'faults'}"])
        store = ArtifactStore(cfg.root)
        write_queries(store, args.queries, "faulty")
        control(port, fault_rate=0.2)
        t0 = time.time()
        s2 = run_search(cfg, store)
        st = control(port)
        rows = store.read_rows("search", "results")
        ident = count_by_identity([r["query_id"] for r in store.read_rows("queries")],
                                  [r["query_id"] for r in rows])
        examples = ident.pop("examples")
        if any(examples.values()):
            print("faults run: rows not one-to-one with query ids:", examples, file=sys.stderr)
        out.update(**ident, failed=s2["failed"], retried=s2["per_provider"]["searxng"]["retried"],
                   faults_injected=st["faults"], faults_wall_s=round(time.time() - t0, 1),
                   faults_calls=st["calls"])

        # 3. the same job again, forced (every stage output rebuilt; the cache answers)
        control(port, fault_rate=0.0)
        s3 = run_search(cfg, store, force=True)
        again = count_by_identity([r["query_id"] for r in store.read_rows("queries")],
                                  [r["query_id"] for r in store.read_rows("search", "results")])
        out.update(rerun_calls=control(port)["calls"], rerun_cached=s3["per_provider"]["searxng"]["cached"],
                   rerun_lost=again["lost"], rerun_duplicated=again["duplicated"])
    finally:
        server.terminate()
        import ray

        ray.shutdown()

    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"\nsearch bench: {args.queries} queries, 2 actors, limit {LIMIT_QPS:g} qps, "
          f"{LATENCY_S * 1000:g} ms server latency")
    print(f"{'figure':<28}{'value':>12}   goal")
    if "qps_ratio_strict" in out:
        out["gcra_vs_strict"] = round(out["qps_ratio"] / out["qps_ratio_strict"], 3)
    for key, goal in [("qps_ratio", ">= 0.95"), ("qps", ""), ("qps_ratio_strict", "baseline"),
                      ("over_limit_429_strict", ""), ("gcra_vs_strict", ""), ("p50_ms", ""), ("p99_ms", ""),
                      ("over_limit_429", "~0"), ("clean_lost", "0"), ("clean_duplicated", "0"),
                      ("lost", "0"), ("duplicated", "0"), ("unexpected", "0"), ("rows_in", ""),
                      ("rows_out", "= rows_in"), ("failed", ""), ("retried", ""),
                      ("faults_injected", ""), ("rerun_calls", "0"), ("rerun_cached", ""),
                      ("rerun_lost", "0"), ("rerun_duplicated", "0"), ("load_avg_1m", "start"),
                      ("load_avg_1m_end", "end"),
                      ("clean_wall_s", ""), ("faults_wall_s", "")]:
        if key in out:
            print(f"{key:<28}{out[key]!s:>12}   {goal}")
    result = {"name": "search", "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/search.py " + " ".join(sys.argv[1:]),
              "machine": f"{os.cpu_count()} cores, no GPU, load average {out['load_avg_1m']} at start", "figures": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
