"""``cm-ray rehearse CONFIG [--cluster FILE]``: the production run, executed whole on this machine.

1. The cluster: ``cluster.node_plan`` of the cluster file (cluster.yaml or a KubeRay manifest), a
   head with the file's resources and a few workers of each type with theirs, each node in its own
   mount namespace (``LocalCluster``): what the head resolves, a worker does not see.
2. The outside world on loopback: moto for the S3 root (same bucket and prefix) and the secret
   store, ``WebStandIn`` for the search providers and the pages (``standins.apply`` points the
   config at them). Each node gets the credentials the way the file provisions them
   (``secrets``): a node type the file gives none starts without them.
3. The four jobs, as users submit them: ``ray job submit --working-dir . -- python jobs/<stage>.py
   --config <the rehearsal config>``; after serve, requests for every culture through the router
   over HTTP, counted by the engine that answered.
4. The report (``report``): per stage where everything landed, per culture what degraded; written
   to ``rehearsal.md`` / ``rehearsal.json`` under the root and printed. Exit 1 naming the stages and
   cultures when anything degraded past the config's ``checks`` or a job failed.

What a rehearsal cannot tell: speed and memory on real GPUs (the work runs on CPU underneath).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

from cm_ray.rehearsal import report, standins

REPO = Path(__file__).resolve().parents[2]
JOBS = ("synthesize", "train", "serve", "evaluate")


def _moto(stack):
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise

    from cm_ray.rehearsal.cluster import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "rehearsal",
            "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def _node_secrets(doc: dict, need: dict[str, str], aws: dict) -> tuple[dict[str, dict], list]:
    """Per node type, the credentials its processes get through the file's own mechanism: a
    Secrets Manager secret (moto) read with ``cm_ray.node_secrets`` as cluster.yaml's setup does,
    or a Kubernetes Secret's keys (envFrom); and the stand-ins taken."""
    import boto3

    from cm_ray.rehearsal.secrets import provisioned
    from cm_ray.rehearsal.web import KEYS

    values = {n: KEYS.get(n, f"rehearsal-{n.lower()}-{uuid.uuid4().hex[:8]}") for n in need}
    prov, env, taken = provisioned(doc), {}, []
    sm = None
    for node_type, p in prov.items():
        got = {n: values[n] for n in p.names if n in values}
        for store in p.stores:
            if doc.get("kind"):  # a Kubernetes Secret: every key becomes a variable
                got.update(values)
                continue
            if sm is None:
                sm = boto3.client("secretsmanager", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")
                sm.create_secret(Name=store, SecretString=json.dumps(values))
            out = subprocess.run([sys.executable, "-m", "cm_ray.node_secrets", store], env={**os.environ, **aws},
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            got.update(dict(line[len("export "):].split("=", 1) for line in out.splitlines()))
            got = {k: v.strip("'") for k, v in got.items()}
        env[node_type] = got
    kinds = sorted({("k8s Secret " if doc.get("kind") else "AWS Secrets Manager secret ") + s
                    for p in prov.values() for s in p.stores})
    if kinds:
        taken.append(standins.StandIn("secrets", ", ".join(kinds), "moto Secrets Manager / node environment",
                                      f"dummy values for {', '.join(sorted(need))}"))
    return env, taken


def _submit(cluster, job: str, config_path: str, log: Path, timeout_s: float) -> dict:
    sid = f"rehearse-{job}-{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    r = cluster.cli("job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                    "--submission-id", sid, "--", "python", f"jobs/{job}.py", "--config", config_path,
                    timeout=timeout_s)
    log.write_text(r.stdout + r.stderr)
    ok = r.returncode == 0 and "succeeded" in r.stdout
    tail = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()][-12:]
    return {"job": job, "ok": ok, "seconds": round(time.time() - t0, 1), "log": str(log),
            "error": None if ok else "\n".join(tail)}


def _serve_requests(cfg, cultures: list[str]) -> list[dict]:
    """One chat request per culture (pinned by name) and one routed, through the app over HTTP."""
    from cm_ray.serve.responses import engine_of
    from cm_ray.serve.stage import _auth_headers, client_url

    url, out = client_url(cfg.serve), []
    for model in [*cultures, "auto"]:
        body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "What do people eat at a wedding?"}]}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    f"{url}/v1/chat/completions", body, {"Content-Type": "application/json",
                                                         **_auth_headers(cfg.serve)}), timeout=300) as r:
                answer = json.loads(r.read())
                out.append({"model": model, "status": r.status, "culture": answer.get("culture"),
                            "engine": engine_of(answer.get("system_fingerprint"), r.headers)})
        except Exception as e:  # a refused request is a finding, not a crash of the rehearsal
            out.append({"model": model, "status": getattr(e, "code", None), "error": str(e)[:300], "engine": None})
    return out


def rehearse(config: str, cluster_file: str | None = None, overrides: list[str] | None = None,
             stages: tuple[str, ...] = JOBS, workdir: str | None = None, max_nodes: dict | None = None,
             web_down: tuple[str, ...] = (), unchecked: list[str] | None = None,
             timeout_s: float = 3600) -> tuple[int, dict]:
    """Rehearse ``config`` on a local cluster shaped like ``cluster_file`` (default: the config's
    ``ray.cluster_config``). ``overrides``: sizes only (``standins.SIZES``). ``unchecked``: further
    overrides a test sets to provoke a degradation (listed in the report as such); ``web_down``:
    providers whose stand-in answers 503 (an outage).
    Returns (exit code, report)."""
    from contextlib import ExitStack

    from cm_ray.config import config_from_dict
    from cm_ray.config.run import apply_overrides
    from cm_ray.rehearsal.cluster import LocalCluster, free_port, node_plan
    from cm_ray.rehearsal.secrets import needed
    from cm_ray.rehearsal.web import WebStandIn

    standins.check_overrides(overrides or [])
    raw = yaml.safe_load(Path(config).read_text()) or {}
    data = apply_overrides(raw, list(overrides or []) + list(unchecked or []))
    prod = config_from_dict(data)  # the production config as it stands: its errors are the user's
    cluster_file = cluster_file or prod.ray.cluster_config
    if not cluster_file:
        raise ValueError("no cluster file: give --cluster FILE or set ray.cluster_config")
    cluster_path = Path(cluster_file) if Path(cluster_file).is_absolute() else Path(config).resolve().parent.parent / cluster_file
    if not cluster_path.exists():
        cluster_path = Path(cluster_file).resolve()
    doc = yaml.safe_load(cluster_path.read_text())
    work = Path(workdir or tempfile.mkdtemp(prefix="cm-ray-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    specs = node_plan(str(cluster_path), max_nodes)
    gpu_nodes = sum(1 for s in specs if s.resources.get("GPU"))
    started = time.time()
    with ExitStack() as stack:
        aws = _moto(stack)
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))  # this process's own env back
        os.environ.update(aws)
        web = stack.enter_context(WebStandIn(down=web_down))
        from cm_ray.rehearsal.web import provider_urls

        root = prod.root if prod.root.startswith("s3://") else f"s3://cm-ray-rehearsal/{prod.name}"
        data_dir = next((str(p) for p in (REPO.parent / "shared" / "data",) if p.exists()), None)
        reh, taken = standins.apply(data, root=root, endpoints=provider_urls(web.base), serve_port=free_port(),
                                    gpu_nodes=max(gpu_nodes, 1), data_dir=data_dir)
        cfg = config_from_dict(reh)
        from cm_ray.storage import ArtifactStore, ensure_bucket

        ensure_bucket(cfg.root)
        need = needed(prod)
        node_env, secret_stand = _node_secrets(doc, need, aws)
        taken += secret_stand
        cfg_path = work / "rehearsal.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        base_env = {**aws, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                           str(Path.home() / ".cache" / "cm_ray" / "torch_extensions"))}
        cluster = stack.enter_context(LocalCluster(specs, work / "ray", env=base_env, node_env=node_env))
        jobs, placed, served = [], {}, []
        seen: set = set()
        for job in [j for j in JOBS if j in stages]:
            print(f"rehearse: ==> {job}", file=sys.stderr, flush=True)
            jobs.append(_submit(cluster, job, str(cfg_path), work / f"{job}.log", timeout_s))
            rows = report.new_placements(cluster, str(cluster_path), seen)
            placed[job] = rows
            if job == "serve" and jobs[-1]["ok"]:
                os.environ.update({k: v for k, v in node_env.get(specs[0].node_type, {}).items()})
                served = _serve_requests(cfg, cfg.cultures)
                cluster.cli("serve", "shutdown", "-y", "--address", cluster.dashboard_url, timeout=120)
        store = ArtifactStore(cfg.root)
        rep = report.build(prod=prod, cfg=cfg, store=store, jobs=jobs, placed=placed, served=served,
                           stand_ins=taken, need=need, provisioned=doc, web=web.stats(), specs=specs,
                           cluster_file=str(cluster_path), config_file=str(config),
                           seconds=round(time.time() - started, 1), unchecked=unchecked or [])
        report.save(rep, store, work)
    return (1 if rep["failures"] else 0), rep
