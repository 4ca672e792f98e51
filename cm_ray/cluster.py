"""The cluster's node types and what they can hold: where resource sizing comes from.

Every stage sizes its requests from the config and, where a field is ``auto``, from the cluster's
*configured* capacity — the node types and how many of each the autoscaler may start — never from
the hardware of the process that runs the driver (under ``ray job submit`` that is the GPU-less head).

Where node types come from, first found wins:
  1. ``ray.cluster_config`` in the run config: a Ray cluster-launcher YAML (``cluster.yaml``) or a
     KubeRay RayCluster / RayJob / RayService manifest (``k8s/*.yaml``);
  2. the running cluster's autoscaler config (what Ray Train and Ray Data read themselves);
  3. ``~/ray_bootstrap_config.yaml``, which the cluster launcher writes on the head;
  4. the nodes alive now (a fixed cluster: each node its own type, count 1).
Pure Python: ``import cm_ray.cluster`` does not import Ray.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    """Logical resources one node of this type offers (CPU, GPU, memory, custom)."""
    max_workers: int = 1
    """Nodes of this type the autoscaler may run (1 for the head or a live node)."""
    min_workers: int = 0
    head: bool = False

    def holds(self, bundle: dict[str, float]) -> bool:
        """Whether one node of this type can host ``bundle``."""
        return all(self.resources.get(k, 0.0) >= v for k, v in bundle.items() if v)

    def count(self, bundle: dict[str, float]) -> int:
        """How many ``bundle``s one node of this type holds at once."""
        need = {k: v for k, v in bundle.items() if v}
        if not need:
            return 0
        return int(min(self.resources.get(k, 0.0) // v for k, v in need.items()))


@dataclass
class Cluster:
    node_types: list[NodeType]
    source: str
    """Where the node types came from (a file path, "autoscaler", "bootstrap", "live nodes")."""
    max_workers: int | None = None
    """The cluster-wide worker cap (cluster.yaml ``max_workers``), if any."""
    notes: list[str] = field(default_factory=list)

    def max_resources(self) -> dict[str, float]:
        """Every resource summed over the most nodes of each type the cluster may run."""
        out: dict[str, float] = {}
        for t in self.node_types:
            for k, v in t.resources.items():
                out[k] = out.get(k, 0.0) + v * t.max_workers
        return out

    def has_gpus(self) -> bool:
        return self.max_resources().get("GPU", 0.0) > 0

    def hosts(self, bundle: dict[str, float]) -> list[str]:
        """Node types one of whose nodes can host ``bundle`` (workers before the head)."""
        return [t.name for t in sorted(self.node_types, key=lambda t: t.head) if t.holds(bundle)]

    def max_at_once(self, bundles: list[dict[str, float]]) -> int:
        """How many copies of a group of ``bundles`` (one trial, one replica) fit in the whole
        cluster at its largest, each bundle on any node that holds it (Ray's PACK strategy)."""
        if not bundles:
            return 0
        per_bundle = []
        for b in bundles:
            per_bundle.append(sum(t.count(b) * t.max_workers for t in self.node_types))
        # A group needs one slot per bundle; identical bundles compete for the same slots.
        shapes: dict[tuple, int] = {}
        for b in bundles:
            key = tuple(sorted((k, v) for k, v in b.items() if v))
            shapes[key] = shapes.get(key, 0) + 1
        n = math.inf
        for b, slots in zip(bundles, per_bundle):
            key = tuple(sorted((k, v) for k, v in b.items() if v))
            n = min(n, slots // shapes[key])
        return int(n)


def _num(v: Any) -> float:
    """A Kubernetes quantity or a number as a float ("8" -> 8, "500m" -> 0.5, "64Gi" -> bytes)."""
    if isinstance(v, (int, float)):
        return float(v)
    m = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*)", str(v).strip())
    if not m:
        raise ValueError(f"not a quantity: {v!r}")
    scale = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    if m.group(2) not in scale:
        raise ValueError(f"unknown unit in {v!r}")
    return float(m.group(1)) * scale[m.group(2)]


def from_launcher_yaml(doc: dict, source: str) -> Cluster:
    """Node types of a Ray cluster-launcher config (``available_node_types``)."""
    types = doc.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ValueError(f"{source}: no available_node_types")
    head = doc.get("head_node_type")
    out = []
    for name, t in types.items():
        if "resources" not in t:
            raise ValueError(f"{source}: available_node_types.{name}.resources must state the node's "
                             "CPU/GPU (cm_ray sizes stages from it)")
        is_head = name == head
        out.append(NodeType(name, {k: float(v) for k, v in t["resources"].items()},
                            max_workers=1 if is_head else int(t.get("max_workers", 0)),
                            min_workers=1 if is_head else int(t.get("min_workers", 0)), head=is_head))
    return Cluster(out, source, max_workers=doc.get("max_workers"))


def _group_resources(group: dict) -> dict[str, float]:
    """A KubeRay group's Ray resources: rayStartParams first, else the ray container's limits."""
    params = group.get("rayStartParams") or {}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or [{}]
    res = containers[0].get("resources") or {}
    limits = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    out: dict[str, float] = {}
    cpu = params.get("num-cpus", limits.get("cpu"))
    if cpu is not None:
        out["CPU"] = _num(cpu)
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpu is not None:
        out["GPU"] = _num(gpu)
    if "memory" in limits:
        out["memory"] = _num(limits["memory"])
    if params.get("resources"):
        import json

        out.update({k: float(v) for k, v in json.loads(str(params["resources"]).strip("'\"")).items()})
    return out


def from_kuberay(doc: dict, source: str) -> Cluster:
    """Node types of a KubeRay RayCluster, RayJob (rayClusterSpec) or RayService (rayClusterConfig)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(kind)
    if not cluster:
        raise ValueError(f"{source}: kind {kind!r} has no Ray cluster spec (RayCluster, RayJob or RayService)")
    out = [NodeType("head", _group_resources(cluster["headGroupSpec"]), head=True, min_workers=1)]
    for g in cluster.get("workerGroupSpecs") or []:
        out.append(NodeType(g["groupName"], _group_resources(g), max_workers=int(g.get("maxReplicas", 0)),
                            min_workers=int(g.get("minReplicas", 0))))
    return Cluster(out, source)


def load_cluster_file(path: str | Path) -> Cluster:
    """Node types from a cluster-launcher YAML or a KubeRay manifest."""
    from cm_ray.safe_yaml import load

    p = Path(path).expanduser()
    doc = load(p)  # with size and alias limits; errors (ValueError) name the file
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: not a YAML mapping")
    try:
        return from_kuberay(doc, str(p)) if "apiVersion" in doc else from_launcher_yaml(doc, str(p))
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of the wrong shape
        raise ValueError(f"{p}: not a cluster-launcher YAML or KubeRay manifest: {type(e).__name__} {e}") from None


def _from_autoscaler() -> Cluster | None:
    """The running cluster's autoscaler config (node groups with their max counts), if any."""
    try:
        from ray._private.state import state

        cfg = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS or no autoscaler: use the next source
        return None
    if cfg is None or not cfg.node_group_configs:
        return None
    out = [NodeType(g.name or f"group{i}", dict(g.resources), max_workers=max(0, g.max_count)
                    if g.max_count != -1 else 10**6, min_workers=g.min_count)
           for i, g in enumerate(cfg.node_group_configs)]
    return Cluster(out, "autoscaler")


def _from_live_nodes() -> Cluster:
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
        is_head = "node:__internal_head__" in n["Resources"]
        out.append(NodeType(f"{'head' if is_head else 'worker'}@{n['NodeManagerAddress']}:"
                            f"{n['NodeManagerPort']}", res, head=is_head))
    return Cluster(out, "live nodes")


def discover(cluster_config: str | None = None) -> Cluster:
    """The cluster's node types from the first source that has them (module docstring)."""
    if cluster_config:
        return load_cluster_file(cluster_config)
    import ray

    if ray.is_initialized():
        got = _from_autoscaler()
        if got is not None:
            return got
    if BOOTSTRAP_CONFIG.exists():
        return load_cluster_file(BOOTSTRAP_CONFIG)
    if ray.is_initialized():
        return _from_live_nodes()
    raise RuntimeError("no cluster to size from: set ray.cluster_config or start Ray first")


def for_config(cfg) -> Cluster:
    """The cluster a run config's stages are sized for (joins or starts Ray when no file is set)."""
    if cfg.ray.cluster_config:
        return load_cluster_file(cfg.ray.cluster_config)
    from cm_ray.ray_utils import init_ray

    init_ray(cfg)
    return discover()
