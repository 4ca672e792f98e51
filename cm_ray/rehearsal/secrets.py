"""Which credentials a run needs, and which node types a cluster file gives them to.

A config needs ``HF_TOKEN`` for a model pulled from the Hugging Face Hub (the paper model is
gated), each HTTP search provider's key (``BRAVE_API_KEY``, ...), ``serve.api_key_env`` and, on the
openai engine, ``synthesis.openai.api_key_env``. Cluster files provision them into the node
environment, never a ``runtime_env``:

- cluster.yaml: a setup command ``python -m cm_ray.node_secrets SECRET_ID > FILE`` (AWS Secrets
  Manager) and start commands that source ``FILE`` before ``ray start``: every key of the secret;
- KubeRay manifests: ``envFrom: [{secretRef: {name: ...}}]`` (every key of that Secret) and
  ``env[].valueFrom.secretKeyRef`` (one name each) on the Ray container.

``missing`` names each (secret, node type) a run would start without. Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NODE_SECRETS = re.compile(r"cm_ray\.node_secrets\s+(\S+)\s*>\s*(\S+)")


@dataclass
class Provision:
    """What one node type's Ray processes get: every key of ``stores`` plus ``names``."""

    stores: list[str] = field(default_factory=list)
    """Secret stores whose every key reaches the node (a Secrets Manager id, a k8s Secret name)."""
    names: set[str] = field(default_factory=set)
    """Single variables set from a secret (k8s ``secretKeyRef``)."""


def _is_hub_id(ref: str | None) -> bool:
    return bool(ref) and not ref.startswith(("embedded:", "s3://", "/", ".", "~")) \
        and re.fullmatch(r"[\w.-]+/[\w.-]+", ref) is not None


def needed(cfg) -> dict[str, str]:
    """``{variable: why}`` for every credential ``cfg`` reads from the environment."""
    from cm_ray.data.providers import HTTP_PROVIDERS

    out: dict[str, str] = {}
    for name in (cfg.search.provider, *cfg.search.fallback):
        key = getattr(HTTP_PROVIDERS.get(name), "key_env", None)
        if key:
            out[key] = f"search provider {name}"
    for fld in ("generator", "base", "encoder"):
        ref = getattr(cfg.models, fld)
        if _is_hub_id(ref):
            out.setdefault("HF_TOKEN", f"models.{fld} {ref} comes from the Hugging Face Hub (gated models need a token)")
    if cfg.serve.api_key_env:
        out[cfg.serve.api_key_env] = "serve.api_key_env"
    if cfg.synthesis.engine == "openai":
        out[cfg.synthesis.openai.api_key_env] = "synthesis.openai.api_key_env"
    return out


def _launcher(doc: dict) -> dict[str, Provision]:
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    out = {}
    for name, spec in types.items():
        is_head = name == head
        setup = list(doc.get("setup_commands") or [])
        setup += (doc.get("head_setup_commands") or []) if is_head else \
            (spec.get("worker_setup_commands") or doc.get("worker_setup_commands") or [])
        start = " ".join(map(str, doc.get("head_start_ray_commands" if is_head else "worker_start_ray_commands") or []))
        prov = Provision()
        for m in _NODE_SECRETS.finditer(" ".join(map(str, setup))):
            secret_id, path = m.groups()
            if re.search(rf"(^|[;&|\s])(\.|source)\s+{re.escape(path)}(\s|;|$)", start):
                prov.stores.append(secret_id)
        out[name] = prov
    return out


def _container_provision(pod: dict) -> Provision:
    prov = Provision()
    for c in ((pod.get("spec") or {}).get("containers") or [])[:1]:  # the Ray container
        for src in c.get("envFrom") or []:
            ref = (src or {}).get("secretRef") or {}
            if ref.get("name"):
                prov.stores.append(ref["name"])
        for e in c.get("env") or []:
            if ((e or {}).get("valueFrom") or {}).get("secretKeyRef"):
                prov.names.add(e["name"])
    return prov


def _kuberay(doc: dict) -> dict[str, Provision]:
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    out = {"head": _container_provision((cluster.get("headGroupSpec") or {}).get("template") or {})}
    for g in cluster.get("workerGroupSpecs") or []:
        out[g.get("groupName", "worker")] = _container_provision(g.get("template") or {})
    return out


def provisioned(doc: dict) -> dict[str, Provision]:
    """Node type -> what its Ray processes are given, from a cluster-launcher YAML or a KubeRay
    RayJob / RayCluster / RayService manifest (already parsed)."""
    return _kuberay(doc) if doc.get("kind") in ("RayJob", "RayCluster", "RayService") else _launcher(doc)


def missing(need: dict[str, str], prov: dict[str, Provision]) -> dict[str, list[str]]:
    """``{node type: [variables it would lack]}``: a node given no secret store lacks every needed
    name it is not given one by one (a store is taken to hold every name the run needs: the
    rehearsal fills its stand-in store with them)."""
    out = {}
    for node_type, p in prov.items():
        lack = [] if p.stores else sorted(n for n in need if n not in p.names)
        if lack:
            out[node_type] = lack
    return out
