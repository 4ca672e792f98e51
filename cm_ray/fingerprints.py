"""What every partition was computed from, and what a rerun has to redo.

A *partition* is the unit a stage skips or redoes: the queries and the search results of one
culture, the synthesized samples of one (culture, task), one adapter, the router. Its fingerprint
hashes exactly the config fields it depends on (``FIELDS``; settings that only change speed, such
as batch sizes, concurrency, rate limits or how trials are packed, are left out) and the versions
of the partitions it reads. ``manifests/fingerprints/<stage>.json`` records, per partition, the
fingerprint, the field values and the upstream versions it was computed from.

Before a stage runs (``prepare``), each partition is *done* (its output exists and its recorded
fingerprint is the current one), *stale* (output from other inputs: the reason names the changed
field, ``MX/offensive: synthesis.prompts_per_pair 2 -> 4``), *missing* or *failed* (the reason the
last attempt gave). Stale outputs are deleted and the record of every partition to compute is
written with a fresh version *before* the stage runs: an output found later was written by a run
with that fingerprint (outputs are written atomically), and each dependent sees the new version,
so it is redone too. Adding a culture therefore computes that culture's data and adapter and the
router (which reads every culture), and nothing else. A root written before fingerprints (no record
file for a stage) has its existing outputs *adopted*: taken as current and recorded, not redone.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from cm_ray import artifacts as A
from cm_ray.artifacts import JOINT

# Config fields each kind of partition depends on: a section (every field in it, minus PERF) or
# one dotted field. The culture and task of a partition are part of its key.
GENERATION = ["models.generator", "synthesis.engine", "synthesis.top_p", "synthesis.dtype",
              "synthesis.guided_json", "synthesis.guided_max_string_chars", "synthesis.guided_max_items",
              "synthesis.openai.model", "synthesis.vllm.max_model_len", "seed"]
FIELDS = {
    "queries": ["queries", *GENERATION],
    "search": ["search"],
    "synthesize": ["synthesis", "models.generator", "models.encoder", "seed"],
    "culturespa": ["culturespa", *GENERATION, "synthesis.temperature", "synthesis.validation_fraction"],
    "clca": ["clca", *GENERATION, "synthesis.temperature", "synthesis.validation_fraction"],
    "train": ["train", "models.base", "models.generator", "seed"],
    "route": ["router", "models.encoder", "seed"],
    "evaluate": ["evaluate", "models.base", "recipe", "seed"],
}
PERF = {
    "search": {"qps", "max_in_flight", "concurrency", "batch_size", "max_retries", "backoff_base_s",
               "backoff_max_s", "timeout_s", "cache", "cache_flush_rows", "actor_cpus", "fetch.timeout_s",
               "endpoint", "endpoints"},
    "synthesis": {"batch_size", "concurrency", "accelerator", "cpus_per_replica", "threads_per_replica",
                  "vllm.max_num_seqs", "vllm.tensor_parallel_size", "vllm.enforce_eager", "vllm.engine_kwargs",
                  "openai.base_url", "openai.api_key_env", "openai.qps", "openai.max_in_flight",
                  "openai.max_retries", "openai.backoff_base_s", "openai.backoff_max_s", "openai.timeout_s"},
    "train": {"max_parallel_trials", "max_failures", "checkpoint_every_steps", "cpus_per_worker", "trials",
              "packs", "max_adapters_per_pack", "joint_baseline", "use_gpu", "backend",
              "local_tokenize_rows"},
    "evaluate": {"workers", "num_gpus", "num_cpus"},
}
"""Fields of a section that change how fast, not what, a partition is computed."""
PARQUET = ("synthesize",)
"""Stages whose partition is one Parquet file (``A.PART``) checked on every plan: one that cannot
be read (cut short, overwritten) is failed, deleted and recomputed by the next run."""


@dataclass
class Part:
    """One partition of a stage: its key, what it depends on, where its output is."""

    stage: str
    key: str
    fields: dict
    upstream: list[tuple[str, str]]
    output: tuple[str, ...] | None
    done: Callable[[Any], bool]
    fp: str = ""
    upstream_versions: dict = field(default_factory=dict)
    state: str = ""
    reason: str = ""


def _flat(value: Any, prefix: str, out: dict) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def config_fields(cfg, names: list[str]) -> dict:
    """``{dotted field: value}`` of ``names`` (whole sections flattened, PERF fields left out)."""
    data = cfg.model_dump(mode="json")
    out: dict = {}
    for name in names:
        node: Any = data
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        top = name.split(".")[0]
        if isinstance(node, dict) and "." not in name:
            flat: dict = {}
            _flat(node, name, flat)
            skip = PERF.get(top, set())
            for k, v in flat.items():
                rel = k.split(".", 1)[1]
                if not any(rel == s or rel.startswith(s + ".") for s in skip) \
                        and not rel.split(".")[-1].startswith("price_"):
                    out[k] = v
        else:
            out[name] = node
    return out


def task_fields(task: str) -> dict:
    """The task a partition is for: its spec's name and a hash of its content (a YAML path works)."""
    from cm_ray.tasks import load_task

    spec = load_task(task)
    return {"task": spec.name, "task_spec": A.stable_id(asdict(spec))}


def _data_parts(cfg) -> list[tuple[str, str, str]]:
    """(stage, key, culture) of every data partition an adapter or the router reads."""
    from cm_ray.tasks import load_task

    if cfg.recipe != "culturemanager":
        return [(cfg.recipe, c, c) for c in cfg.cultures]
    return [("synthesize", f"{c}/{load_task(t).name}", c) for c in cfg.cultures for t in cfg.tasks]


def stage_parts(name: str, cfg) -> list[Part]:
    """The partitions of stage ``name`` under ``cfg`` (empty for serve / evaluate)."""
    from cm_ray.train.tune import adapter_complete, adapter_names

    tasks = {t: task_fields(t) for t in cfg.tasks}
    fields = config_fields(cfg, FIELDS.get(name, []))
    all_tasks = {"tasks": [tasks[t] for t in cfg.tasks]}
    parts = []
    if name == "queries":
        for c in cfg.cultures:
            parts.append(Part(name, c, {**fields, **all_tasks}, [], A.queries_dir(c),
                              lambda s, c=c: s.exists(*A.queries_file(c))))
    elif name == "search":
        for c in cfg.cultures:
            parts.append(Part(name, c, fields, [("queries", c)], A.search_results_dir(c),
                              lambda s, c=c: s.exists(*A.search_results_file(c))))
    elif name == "synthesize":
        for c in cfg.cultures:
            for t in cfg.tasks:
                tn = tasks[t]["task"]
                parts.append(Part(name, f"{c}/{tn}", {**fields, **tasks[t]}, [("search", c)],
                                  A.synth_dir(c, tn), lambda s, c=c, tn=tn: s.exists(*A.synth_file(c, tn))))
    elif name in ("culturespa", "clca"):
        for c in cfg.cultures:
            parts.append(Part(name, c, {**fields, **all_tasks}, [], None,
                              lambda s, c=c: bool(A.synth_files(s, c))))
    elif name == "train":
        data = _data_parts(cfg)
        for n in adapter_names(cfg):
            ups = [(st, k) for st, k, c in data if n == JOINT or c == n]
            parts.append(Part(name, n, {**fields, "train.mode": cfg.train.mode}, ups, A.adapter_dir(n),
                              lambda s, n=n: adapter_complete(s, n)))
    elif name == "route":
        parts.append(Part(name, "router", fields, [(st, k) for st, k, _ in _data_parts(cfg)],
                          A.router_dir(), lambda s: A.published_router(s) is not None))
    elif name == "evaluate":  # one cell per culture: the adapters and router its systems read
        routed = {"culturemanager", "culturemanager_locale"} & set(cfg.evaluate.systems)
        for c in cfg.cultures:
            ups = [("train", n) for n in adapter_names(cfg) if n == c or routed or (n == JOINT and "joint"
                   in cfg.evaluate.systems)] + ([("route", "router")] if routed else [])
            parts.append(Part(name, c, fields, ups, None, lambda s: s.exists(*A.eval_dir("results.json"))))
    return parts


class Records:
    """The recorded fingerprints of every stage in one store (read once, written per stage)."""

    def __init__(self, store):
        self.store, self._cache, self._found = store, {}, {}

    def get(self, stage: str) -> dict:
        """A stage's records; a record file that does not parse raises ``UnreadableRecord`` (taking
        it for "nothing recorded" would delete every finished partition of the stage)."""
        if stage not in self._cache:
            got = self.store.read_record(*A.fingerprints_file(stage), what="fingerprint record")
            self._found[stage], self._cache[stage] = got is not None, got or {}
        return self._cache[stage]

    def legacy(self, stage: str) -> bool:
        """Whether the root has no record of ``stage`` at all (written before fingerprints)."""
        self.get(stage)
        return not self._found[stage]

    def save(self, stage: str) -> None:
        self.store.write_json(self.get(stage), *A.fingerprints_file(stage))


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def why_changed(old: dict, part: Part) -> str:
    """``field a -> b`` for every changed field, then the upstream partitions that were redone."""
    before, now = old.get("fields", {}), part.fields
    out = [f"{k} {_show(before.get(k))} -> {_show(now.get(k))}"
           for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    ups, now_ups = old.get("upstream", {}), part.upstream_versions
    for what, keys in (("added", sorted(set(now_ups) - set(ups))), ("removed", sorted(set(ups) - set(now_ups))),
                       ("recomputed", sorted(u for u in set(ups) & set(now_ups) if ups[u] != now_ups[u]))):
        if keys:
            out.append(("input " if len(keys) == 1 else "inputs ") + ", ".join(keys[:4])
                       + (f" (+{len(keys) - 4})" if len(keys) > 4 else "") + f" {what}")
    return "; ".join(out) or "fingerprint changed"


def _version(rec: dict | None) -> str | None:
    """An upstream partition's version as its readers see it: None until its output is complete."""
    return rec.get("version") if rec and rec.get("complete") else None


def plan(name: str, cfg, store, force: bool = False, records: Records | None = None) -> list[Part]:
    """Every partition of stage ``name`` with its state (done / stale / missing / failed) and reason."""
    records = records or Records(store)
    mine = records.get(name)
    parts = stage_parts(name, cfg)
    for p in parts:
        p.upstream_versions = {f"{st}/{k}": _version(records.get(st).get(k)) for st, k in p.upstream}
        p.fp = A.stable_id(p.fields, p.upstream_versions)
        old = mine.get(p.key)
        if force:
            p.state, p.reason = "stale", "--force"
        elif (old or {}).get("failed") and old.get("fp") == p.fp:
            p.state, p.reason = "failed", old["failed"]  # with its output, when it degraded
        elif not p.done(store):
            p.state, p.reason = "missing", "missing"
        elif name in PARQUET and (bad := A.unreadable(store, *p.output, A.PART)):
            p.state, p.reason = "failed", f"unreadable: {bad}"  # cut short: deleted and redone
        elif old is None and records.legacy(name):
            # A root from before fingerprints: its outputs are taken as current (recorded now),
            # rather than redoing a finished run; later changes are detected from here on.
            p.state, p.reason = "adopted", "written before fingerprints: taken as current"
        elif old is None:
            p.state, p.reason = "stale", "no fingerprint recorded"
        elif old.get("fp") != p.fp:
            p.state, p.reason = "stale", why_changed(old, p)
        else:
            p.state = "done"
    return parts


def prepare(name: str, cfg, store, force: bool = False, log=None) -> list[Part]:
    """Plan stage ``name``, print why each partition is computed, delete stale outputs and record
    the fingerprints of the partitions about to be computed. Returns the partitions to compute."""
    records = Records(store)
    parts = plan(name, cfg, store, force, records)
    todo = [p for p in parts if p.state not in ("done", "adopted")]
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    adopted = [p.key for p in parts if p.state == "adopted"]
    if adopted:
        log(f"{name}: {len(adopted)} partitions written before fingerprints taken as current")
    if todo:
        log(f"{name}: {len(todo)} of {len(parts)} partitions to compute")
        for p in todo[:20]:
            log(f"  {p.key}: {p.reason}")
        if len(todo) > 20:
            log(f"  ... and {len(todo) - 20} more")
    mine = records.get(name)
    changed = bool(todo)
    for p in parts:
        if p.state == "adopted":
            mine[p.key] = {"fp": p.fp, "fields": p.fields, "upstream": p.upstream_versions, "complete": True,
                           "version": A.stable_id(p.fp, "adopted"), "recorded_at": time.time()}
            changed = True
        elif p.state == "done" and not mine[p.key].get("complete"):
            mine[p.key]["complete"] = changed = True  # finished by a run that was stopped after it
    for p in todo:
        degraded = p.state == "failed" and p.done(store)  # finished, but past a checks threshold
        if (p.state == "stale" or degraded) and p.output is not None and store.exists(*p.output):
            store.delete(*p.output)
        old = mine.get(p.key) or {}
        # The same inputs as an attempt that did not finish (a stopped job, a failure): the same
        # version, so the attempt's checkpoints (named after it) are picked up again. A degraded
        # output is replaced by a new version, so its readers are recomputed too.
        same = p.state in ("missing", "failed") and not degraded and old.get("fp") == p.fp and old.get("version")
        mine[p.key] = {"fp": p.fp, "fields": p.fields, "upstream": p.upstream_versions,
                       "version": old["version"] if same else A.stable_id(p.fp, time.time(), uuid.uuid4().hex),
                       "recorded_at": time.time()}
    if changed:
        records.save(name)
    return todo


def finish(name: str, store, todo: list[Part], summary: dict, extra_failed: dict | None = None) -> None:
    """After a stage: mark the partitions it completed, and keep the reason of each it reports as
    failed (``summary["failed"]`` / ``summary["no_data"]``, and ``extra_failed``: partitions
    degraded past their threshold; shown by ``cm-ray status``, recomputed by the next run)."""
    failed = dict(summary.get("failed") or {}) if isinstance(summary.get("failed"), dict) else {}
    failed.update({n: "no synthesized rows to train on" for n in summary.get("no_data") or []})
    failed.update(extra_failed or {})
    records = Records(store)
    mine = records.get(name)
    for p in todo:
        if p.key in mine:
            mine[p.key]["complete"] = p.done(store)
    for key, rec in mine.items():
        rec["failed"] = failed.get(key)
    records.save(name)


def stale_warnings(cfg, store) -> list[str]:
    """One line per adapter or router that exists but is stale (what serve / evaluate would use)."""
    records = Records(store)
    out = []
    for stage in ("train", "route"):
        for p in plan(stage, cfg, store, records=records):
            if p.state == "stale":
                out.append(f"stale {'adapter ' + p.key if stage == 'train' else 'router'}: {p.reason}")
    return out
