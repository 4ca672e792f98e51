"""What landed where on a (rehearsal) cluster: every actor, task and placement-group bundle Ray's
state API knows, with the node type it ran on and what it asked for; and the check that flags a
request placed on a node type that does not declare those resources (``placement`` degradations).
"""

from __future__ import annotations

import os

from cm_ray.rehearsal.cluster import NODE_LABEL, TYPE_LABEL

_SKIP = {"memory", "object_store_memory", "bundle"}  # sized by Ray per node; a group's marker


def _plain(resources: dict | None) -> dict[str, float]:
    """Requested resources without placement-group suffixes (``CPU_group_0_<pg>`` -> ``CPU``)."""
    out: dict[str, float] = {}
    for k, v in (resources or {}).items():
        base = k.split("_group_")[0]
        if v and base not in _SKIP and not base.startswith("node:"):
            out[base] = max(out.get(base, 0.0), float(v))
    return out


def placements(address: str, cluster=None) -> list[dict]:
    """Every actor, normal task and placement-group bundle Ray's state API knows, one row each:
    ``{kind, name, id, state, node_id, node, node_type, requested, declared, ok}``.

    ``node_type`` comes from the node's labels (``LocalCluster``; KubeRay's ``ray.io/node-group``),
    ``declared`` from ``cluster`` (a ``Cluster`` or cluster file) for that type, else the node's
    own resources. ``ok`` is False where the node type does not declare what was requested (a GPU
    request on a node type without GPUs): ``misplaced`` lists those. ``address``: the dashboard URL.
    """
    import dataclasses

    from ray.util import state

    from cm_ray.cluster import Cluster, load_cluster_file

    _token_mode()
    types = {}
    if cluster is not None:
        c = cluster if isinstance(cluster, Cluster) else load_cluster_file(cluster)
        types = {t.name: {k: float(v) for k, v in t.resources.items()} for t in c.node_types}

    def d(x):  # the state API's records are dataclasses
        return x if isinstance(x, dict) else dataclasses.asdict(x)

    nodes = {}
    for n in map(d, state.list_nodes(address=address, detail=True, limit=10000)):
        labels = n.get("labels") or {}
        ntype = labels.get(TYPE_LABEL) or labels.get("ray.io/node-group") or (
            "head" if n.get("is_head_node") else f"node-{n['node_id'][:8]}")
        nodes[n["node_id"]] = {"node": labels.get(NODE_LABEL) or n.get("node_name"), "node_type": ntype,
                               "declared": types.get(ntype, _plain(n.get("resources_total")))}
    rows = []

    def add(kind, name, st, node_id, requested, rid):
        where = nodes.get(node_id, {"node": None, "node_type": None, "declared": {}})
        req = _plain(requested)
        ok = node_id not in nodes or all(where["declared"].get(k, 0.0) >= v for k, v in req.items())
        rows.append({"kind": kind, "name": name, "id": rid, "state": st, "node_id": node_id, **where,
                     "requested": req, "ok": ok})

    for a in map(d, state.list_actors(address=address, detail=True, limit=10000)):
        add("actor", a.get("class_name") or a.get("name"), a.get("state"), a.get("node_id"),
            a.get("required_resources"), a.get("actor_id"))
    for t in map(d, state.list_tasks(address=address, detail=True, limit=10000,
                                     filters=[("type", "=", "NORMAL_TASK")])):
        add("task", t.get("func_or_class_name") or t.get("name"), t.get("state"), t.get("node_id"),
            t.get("required_resources"), f"{t.get('task_id')}:{t.get('attempt_number', 0)}")
    for pg in map(d, state.list_placement_groups(address=address, detail=True, limit=10000)):
        for i, b in enumerate(pg.get("bundles") or []):
            add("bundle", f"{pg.get('name') or pg['placement_group_id'][:8]}[{i}]",
                pg.get("state"), b.get("node_id"), b.get("unit_resources"), f"{pg['placement_group_id']}:{i}")
    return rows


def misplaced(rows: list[dict]) -> list[dict]:
    """The placements whose node type does not declare what they requested."""
    return [r for r in rows if not r["ok"]]


def placement_degradation(rows: list[dict], key: str) -> dict:
    """A ``checks.degradation("placement", key, ...)`` record: misplaced of all placed rows."""
    from cm_ray import checks

    bad, placed = misplaced(rows), [r for r in rows if r["node_id"]]
    detail = "; ".join(f"{r['kind']} {r['name']} asked {r['requested']} on {r['node_type']}" for r in bad[:5])
    return checks.degradation("placement", key, len(bad), len(placed), detail)


def _token_mode() -> None:
    """Ray's own rule for its CLI: with RAY_AUTH_MODE unset, a token on this machine means token
    mode (a cluster started here by Ray or ``LocalCluster`` wants it on state API calls)."""
    if "RAY_AUTH_MODE" not in os.environ:
        from ray._private.authentication import authentication_token_setup as auth

        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
