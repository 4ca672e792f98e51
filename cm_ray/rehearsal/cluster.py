"""A local Ray cluster shaped like a cluster file, each node with private caches: the rehearsal.

``node_plan`` turns a cluster-launcher YAML or KubeRay manifest (``cm_ray.cluster``) into nodes to
start here: the head with the file's head resources (0 CPUs where it says so) and a few workers of
each type with their *declared* logical resources (GPUs and custom resources such as
``accelerator_type:L40S`` are taken at face value by Ray; the work runs on CPU underneath).
``LocalCluster`` starts them with ``ray start`` on 127.0.0.1, each node inside its own mount
namespace with a tmpfs over the model caches (``$CM_RAY_CACHE`` or ``~/.cache/cm_ray``: ``models``
and ``s3``), the Hugging Face cache and a node-private TMPDIR, as separate cloud machines have:
a model resolved on the head is not on a worker. The venv and Ray's session dirs stay shared.
Processes are stopped by their own PIDs only (never ``ray stop``). What landed where on it:
``cm_ray.rehearsal.placement``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODE_LABEL, TYPE_LABEL = "cm-ray/node", "cm-ray/node-type"
DEFAULT_COUNTS = {"cpu": 1, "gpu": 2}
"""Workers per type by default: one CPU worker, two GPU workers (a 2-worker training trial fits)."""


def free_port() -> int:
    with socket.socket() as s:
        return s.bind(("127.0.0.1", 0)) or s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, every: float = 1.0) -> None:
    """Poll ``pred`` until truthy (OSError counts as not yet); TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class NodeSpec:
    """One node to start: its name, its type in the cluster file and its declared resources."""

    name: str
    node_type: str
    resources: dict[str, float]
    head: bool = False
    object_store_bytes: int | None = 100 * 2**20
    """``--object-store-memory``; None: Ray's default (a share of this machine's memory)."""

    def ray_args(self) -> list[str]:
        r = {k: float(v) for k, v in self.resources.items() if k != "object_store_memory"}
        args = [f"--num-gpus={int(r.pop('GPU', 0))}",
                f"--labels={NODE_LABEL}={self.name},{TYPE_LABEL}={self.node_type}"]
        args += [f"--object-store-memory={self.object_store_bytes}"] if self.object_store_bytes else []
        args += [f"--num-cpus={int(r.pop('CPU'))}"] if "CPU" in r else []
        args += [f"--memory={int(r.pop('memory'))}"] if "memory" in r else []
        return args + (["--resources=" + json.dumps(r)] if r else [])


def node_plan(cluster, max_nodes_per_type: dict[str, int] | None = None,
              object_store_bytes: int = 100 * 2**20) -> list[NodeSpec]:
    """Nodes for a local rehearsal of ``cluster`` (a ``cm_ray.cluster.Cluster`` or a cluster file).

    Args:
        max_nodes_per_type: workers per type name; unset types get ``DEFAULT_COUNTS`` (1 CPU-only,
            2 with GPUs), never more than the type's ``max_workers``.
        object_store_bytes: ``--object-store-memory`` of every node (small: many nodes, one host).
    """
    from cm_ray.cluster import Cluster, load_cluster_file

    c = cluster if isinstance(cluster, Cluster) else load_cluster_file(cluster)
    wanted = dict(max_nodes_per_type or {})
    if unknown := set(wanted) - {t.name for t in c.node_types}:
        raise ValueError(f"max_nodes_per_type: no node type {sorted(unknown)} in {c.source} "
                         f"(types: {', '.join(t.name for t in c.node_types)})")
    if len(heads := [t for t in c.node_types if t.head]) != 1:
        raise ValueError(f"{c.source}: {len(heads)} head node types (one expected)")
    plan = [NodeSpec("head", heads[0].name, dict(heads[0].resources), True, object_store_bytes)]
    for t in c.node_types:
        if t.head:
            continue
        default = DEFAULT_COUNTS["gpu" if t.resources.get("GPU") else "cpu"]
        for i in range(min(wanted.get(t.name, default), t.max_workers)):
            plan.append(NodeSpec(f"{t.name}-{i}", t.name, dict(t.resources), False, object_store_bytes))
    return plan


def private_dirs(env: dict) -> list[str]:
    """What each node gets a tmpfs over: the project's model caches and the Hugging Face cache."""
    home = Path(env.get("HOME") or Path.home())
    cache = Path(env.get("CM_RAY_CACHE") or home / ".cache" / "cm_ray")
    hf = Path(env.get("HF_HOME") or home / ".cache" / "huggingface")
    return [str(cache / "models"), str(cache / "s3"), str(hf)]


class LocalCluster:
    """Ray nodes started with ``ray start --block`` on 127.0.0.1, as on cluster machines.

    ``with LocalCluster(node_plan("cluster.yaml"), workdir) as c:`` starts the head (with the
    dashboard and jobs API) and every worker; ``c.address`` is the GCS address, ``c.dashboard_url``
    what ``ray job submit --address`` takes, ``c.nodes`` one ``{name, node_type, node_id,
    resources}`` per node, ``c.env`` the environment for ``ray`` CLI calls (``cli``).
    ``private=True`` (default) starts each node in its own mount namespace (``unshare -m``, root)
    with ``private_dirs`` and its TMPDIR on tmpfs. Ray's auth: token mode, as a Ray started on this
    machine before leaves ``~/.ray/auth_token`` (one is made when missing). ``node_env``: extra
    environment per node type (what a cluster file provisions into its nodes, e.g. credentials).
    """

    def __init__(self, specs: list[NodeSpec], workdir: str | Path, env: dict | None = None,
                 private: bool = True, timeout_s: float = 300, node_env: dict[str, dict] | None = None):
        self.specs, self.workdir, self.private, self.timeout_s = list(specs), Path(workdir), private, timeout_s
        self.node_env = node_env or {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", **(env or {})}
        self.temp = Path("/tmp") / f"cmr-{os.getpid()}-{free_port()}"  # Ray's socket paths: <108 bytes
        self.procs: list[tuple[subprocess.Popen, object]] = []
        self.temps: list[Path] = []
        self.gcs = self.address = self.dashboard_url = None
        self.nodes: list[dict] = []

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        if len(heads := [s for s in self.specs if s.head]) != 1:
            raise ValueError(f"one head node expected, got {len(heads)}")
        self.start_head(heads[0])
        # One after the other: started together on 2 busy cores, a raylet missed Ray's ~30 s
        # registration deadline ("The current node timed out during startup").
        for s in [s for s in self.specs if not s.head]:
            self.add_node(s)
        self.nodes = self.list_nodes()
        return self

    def _ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]

    def _command(self, spec: NodeSpec, ray_cmd: list[str]) -> list[str]:
        if not self.private:
            return ray_cmd
        tmp = Path(f"{self.temp}-tmp-{spec.name}")  # short: vLLM's IPC sockets live here (<108 bytes)
        self.temps.append(tmp)
        lines = ["set -e"]
        for d in [*private_dirs(self.env), str(tmp)]:
            lines.append(f"mkdir -p {shlex.quote(d)} && mount -t tmpfs cm-ray-{spec.name} {shlex.quote(d)}")
        lines.append(f"export TMPDIR={shlex.quote(str(tmp))}")
        lines.append("exec " + shlex.join(ray_cmd))
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", "\n".join(lines)]

    def _start(self, spec: NodeSpec, args: list[str]) -> None:
        temp = self.temp if spec.head else Path(f"{self.temp}-{len(self.temps)}")
        self.temps.append(temp)  # each node its own: runtime-env agents must not share a cache
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args, *spec.ray_args(),
               *self._ports(), f"--temp-dir={temp}", "--disable-usage-stats"]
        log = open(self.workdir / f"ray-{spec.name}.log", "w")
        env = {**self.env, **self.node_env.get(spec.node_type, {})}
        self.procs.append((subprocess.Popen(self._command(spec, cmd), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True), log))

    def start_head(self, spec: NodeSpec) -> None:
        if self.env.get("RAY_AUTH_MODE") == "token":  # `ray start` makes none itself
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env,
                           capture_output=True, check=True, timeout=120)
        port, dash = free_port(), free_port()
        self._start(spec, ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"])
        self.gcs = self.address = f"127.0.0.1:{port}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        # The jobs API answers once the dashboard (with its auth) is up.
        wait_for(lambda: self.cli("job", "list", timeout=60).returncode == 0, self.timeout_s, "the jobs API")

    def add_node(self, spec: NodeSpec) -> None:
        self._start(spec, [f"--address={self.gcs}"])
        want = len(self.procs)
        wait_for(lambda: len(self.list_nodes()) >= want, self.timeout_s, f"{want} Ray nodes ({spec.name})")

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``ray <args>`` against this cluster's dashboard, with its environment."""
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, "RAY_ADDRESS": self.dashboard_url},
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def list_nodes(self) -> list[dict]:
        """The alive nodes: ``{name, node_type, node_id, resources}`` each (labels name them)."""
        r = self.cli("list", "nodes", "--detail", "--filter", "state=ALIVE", "--format", "json", timeout=60)
        try:
            found = json.loads(r.stdout) if r.returncode == 0 else []
        except ValueError:  # a warning instead of the listing while a node registers: not yet
            return []
        return [{"name": n.get("labels", {}).get(NODE_LABEL), "node_type": n.get("labels", {}).get(TYPE_LABEL),
                 "node_id": n["node_id"], "resources": n.get("resources_total", {})} for n in found]

    def node_id(self, name: str) -> str:
        for n in self.nodes:
            if n["name"] == name:
                return n["node_id"]
        raise KeyError(f"no node {name!r} (nodes: {[n['name'] for n in self.nodes]})")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops this cluster's own process groups, all at once, and removes its temp dirs.

        SIGTERM first; what still runs after ``grace_s`` is SIGKILLed (``ray start --block`` and
        the GCS take ~30 s to end on SIGTERM, one node after the other, and nothing here needs
        their graceful shutdown: the cluster and its temp dirs are thrown away)."""
        import shutil

        def signal_all(sig: int) -> None:
            for proc, _ in self.procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

        signal_all(signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p.poll() is None for p, _ in self.procs):
            time.sleep(0.2)
        signal_all(signal.SIGKILL)  # the rest of each group too: workers, agents, engines
        for proc, log in self.procs:
            proc.wait(timeout=30)
            log.close()
        self.procs = []
        for t in self.temps:
            shutil.rmtree(t, ignore_errors=True)
