"""The artifact contract: every path under the root, the one synthesis row schema, the reserved
adapter names, stable ids, the train/validation split and the one culture system prompt.

Every stage reads and writes through these names; no other module spells a stage path by hand.
Layout under the root (one culture key names every per-culture thing):

    queries/culture=XX/part-0.parquet              generated search queries
    search/results/culture=XX/part-0.parquet       normalized search hits, one row per query
    search/cache/<provider>/...                    provider answers (resume, reruns)
    synth/culture=XX/task=T/part-0.parquet         synthesized samples (SYNTH_COLUMNS)
    synth/_stats/XX.T.json  synth/summary.json     per-partition filter counts, their merge
    adapters/<name>/current.json                   pointer naming the current version (atomic)
    adapters/<name>/versions/<hash>/               a plain PEFT adapter dir (+ metrics.json)
    router/current.json  router/versions/<hash>/   router head, config, metrics (same scheme)
    checkpoints/                                   Ray Train checkpoints
    manifests/<stage>.json                         what each stage wrote, with counts
    manifests/fingerprints/<stage>.json            per partition: the inputs it was computed from
    recipes/<recipe>/<name>                        a recipe's inspection files (questions, dialogues)
    eval/                                          tables and plots
    ablation/<variant>/  ablation/comparison.*     one full run root per ablation variant, the table

Importing this module is cheap (stdlib only; pyarrow and jsonschema load on first use).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# -- reserved adapter / route names -------------------------------------------------------------
JOINT = "_joint"
"""The all-culture adapter's directory and model id."""
NONE = "none"
"""The router's answer when no culture is confident enough: the base model answers."""
AUTO = "auto"
"""Serve model id: let the router pick the adapter."""
BASE = "base"
"""Serve model id: the base model, no adapter."""

PART = "part-0.parquet"
"""The one data file of a partition; written last and atomically, it marks the partition done."""


# -- paths (tuples of parts, for ArtifactStore methods) ------------------------------------------
def queries_dir(culture: str | None = None) -> tuple[str, ...]:
    return ("queries",) + ((f"culture={culture}",) if culture else ())


def queries_file(culture: str) -> tuple[str, ...]:
    return (*queries_dir(culture), PART)


def search_results_dir(culture: str | None = None) -> tuple[str, ...]:
    return ("search", "results") + ((f"culture={culture}",) if culture else ())


def search_results_file(culture: str) -> tuple[str, ...]:
    return (*search_results_dir(culture), PART)


def search_cache_dir(*parts: str) -> tuple[str, ...]:
    return ("search", "cache", *parts)


def synth_dir(culture: str | None = None, task: str | None = None) -> tuple[str, ...]:
    if task and not culture:
        raise ValueError("a synth task partition needs its culture")
    return ("synth",) + ((f"culture={culture}",) if culture else ()) + ((f"task={task}",) if task else ())


def synth_file(culture: str, task: str) -> tuple[str, ...]:
    return (*synth_dir(culture, task), PART)


def synth_stats_file(culture: str, task: str) -> tuple[str, ...]:
    return ("synth", "_stats", f"{culture}.{task}.json")


def synth_summary_file() -> tuple[str, ...]:
    return ("synth", "summary.json")


def adapters_dir() -> tuple[str, ...]:
    return ("adapters",)


def adapter_dir(name: str) -> tuple[str, ...]:
    return ("adapters", name)


def router_dir(*parts: str) -> tuple[str, ...]:
    return ("router", *parts)


def published(store: Any, parts: tuple[str, ...], marker: str) -> tuple[tuple[str, ...], str | None] | None:
    """(parts of the current version, version id) of a directory published with
    ``store.publish_dir`` (the id is its content hash; None for a directory written in place),
    or None when no version holding ``marker`` is published. Every reader resolves this way."""
    got = store.resolve_dir(*parts)
    return got if got is not None and store.exists(*got[0], marker) else None


def published_adapter(store: Any, name: str) -> tuple[tuple[str, ...], str | None] | None:
    """The current version of adapter ``name`` (a plain PEFT dir), see ``published``."""
    return published(store, adapter_dir(name), "adapter_config.json")


def published_router(store: Any) -> tuple[tuple[str, ...], str | None] | None:
    """The current version of the router (head.npz, router.json, metrics.json)."""
    return published(store, router_dir(), "router.json")


def checkpoints_dir(*parts: str) -> tuple[str, ...]:
    return ("checkpoints", *parts)


def manifest_file(stage: str) -> tuple[str, ...]:
    return ("manifests", f"{stage}.json")


def fingerprints_file(stage: str) -> tuple[str, ...]:
    """What each partition of ``stage`` was (or is being) computed from (``cm_ray.fingerprints``)."""
    return ("manifests", "fingerprints", f"{stage}.json")


def eval_dir(*parts: str) -> tuple[str, ...]:
    return ("eval", *parts)


def ablation_dir(*parts: str) -> tuple[str, ...]:
    """``ablation/<variant>`` is a run root of its own (same layout); the comparison sits beside."""
    return ("ablation", *parts)


def recipe_file(recipe: str, name: str) -> tuple[str, ...]:
    """A data recipe's file for inspection (not read by later stages), e.g. CultureSPA's questions."""
    return ("recipes", recipe, name)


DATA_PREFIXES = ("queries", "search", "synth")
"""Top-level directories of the data stages (what an ablation variant may share or redo)."""


# -- stable ids and the split ------------------------------------------------------------------
def stable_id(*parts: Any, n: int = 16) -> str:
    """A short hex id that is the same in every process and run (unlike ``hash``)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def split_of(ids: list[str], fraction: float) -> dict[str, str]:
    """The train/validation split of one partition: the ``round(fraction * n)`` ids with the lowest
    hash go to validation (at least one from 3 rows up; none below, so tiny partitions still train)."""
    n_val = max(1, round(fraction * len(ids))) if len(ids) >= 3 and fraction > 0 else 0
    order = sorted(ids, key=lambda i: stable_id("split", i))
    return {i: ("validation" if rank < n_val else "train") for rank, i in enumerate(order)}


# -- the culture prompt --------------------------------------------------------------------------
def culture_system_prompt(culture: str) -> str:
    """The one culture-naming system prompt: CultureSPA's culture-aware persona. The joint adapter
    is trained with it, the ``prompted`` system and recipes use it, evaluation uses it for both."""
    from cm_ray.cultures import get_culture

    name = get_culture(culture).name
    return f"You are a person with a {name} cultural background. Answer as a typical person from {name} would."


def adapter_system_prompt(adapter: str, culture: str, recipe: str) -> str | None:
    """The system prompt ``adapter`` was trained with for ``culture``'s rows, so evaluation asks it
    the same way: the joint adapter always gets the culture prompt (``train.tune`` adds it);
    culturespa writes it into every per-culture row; the culturemanager recipe's rows carry none,
    and clca's per-persona prompts belong to no single request, so those adapters get none."""
    if adapter == JOINT or recipe == "culturespa":
        return culture_system_prompt(culture)
    return None


# -- the synthesis row schema ---------------------------------------------------------------------
SYNTH_COLUMNS = ("id", "culture", "task", "split", "sample_json", "input", "output", "messages",
                 "label", "query_ids", "snippet_urls", "engine", "model", "prompt_hash", "relevance")
"""Columns of every synth partition, in order, whichever recipe wrote it."""

_STR, _NSTR = {"type": "string"}, {"type": ["string", "null"]}
SYNTH_ROW_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "culture": {"type": "string", "minLength": 2},
        "task": {"type": "string", "minLength": 1},
        "split": {"enum": ["train", "validation"]},
        "sample_json": _STR, "input": _STR, "output": _STR,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"role": {"enum": ["system", "user", "assistant"]},
                                             "content": _STR},
            "required": ["role", "content"], "additionalProperties": False}},
        "label": _NSTR,
        "query_ids": {"type": "array", "items": _STR},
        "snippet_urls": {"type": "array", "items": _STR},
        "engine": _STR, "model": _STR, "prompt_hash": _STR,
        "relevance": {"type": ["number", "null"]},
    },
    "required": list(SYNTH_COLUMNS),
    "additionalProperties": False,
}
"""JSON Schema of one synth row (what ``validate_synth_rows`` checks before a partition is written)."""


def synth_schema() -> "pa.Schema":
    """The Arrow schema of a synth partition (column order = SYNTH_COLUMNS)."""
    import pyarrow as pa

    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    types = {"messages": pa.list_(msg), "query_ids": pa.list_(pa.string()),
             "snippet_urls": pa.list_(pa.string()), "relevance": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in SYNTH_COLUMNS])


@lru_cache(maxsize=1)
def _row_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(SYNTH_ROW_SCHEMA)


def validate_synth_rows(rows: list[dict]) -> None:
    """Raise ValueError naming the first row and field that break the synth row schema."""
    v = _row_validator()
    for i, row in enumerate(rows):
        err = next(iter(sorted(v.iter_errors(row), key=lambda e: list(e.path))), None)
        if err is not None:
            where = ".".join(str(p) for p in err.path) or "<row>"
            raise ValueError(f"synth row {i} (id {row.get('id')!r}): {where}: {err.message}")


def synth_row(*, culture: str, task: str, split: str, sample: Any, input: str, output: str,
              messages: list[dict], label: str | None = None, query_ids: list[str] | None = None,
              snippet_urls: list[str] | None = None, engine: str = "", model: str = "",
              prompt_hash: str = "", relevance: float | None = None, id: str | None = None) -> dict:
    """One row in the synth contract; ``id`` defaults to the stable id of (culture, task, sample)."""
    sample_json = sample if isinstance(sample, str) else json.dumps(sample, ensure_ascii=False, sort_keys=True)
    return {"id": id or stable_id(culture, task, sample_json), "culture": culture, "task": task,
            "split": split, "sample_json": sample_json, "input": input, "output": output,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "label": None if label is None else str(label),
            "query_ids": [] if query_ids is None else [str(q) for q in query_ids],
            "snippet_urls": [] if snippet_urls is None else [str(u) for u in snippet_urls], "engine": engine or "", "model": model or "",
            "prompt_hash": prompt_hash or "",
            "relevance": None if relevance is None or relevance != relevance else float(relevance)}


def write_synth_partition(store: Any, culture: str, task: str, rows: list[dict]) -> str:
    """Validate ``rows`` against the contract and write them as the partition's one file (atomic;
    the file is the completion marker). Returns its URI."""
    import pyarrow as pa

    for r in rows:
        if r.get("culture") != culture or r.get("task") != task:
            raise ValueError(f"row {r.get('id')!r} belongs to {r.get('culture')}/{r.get('task')}, "
                             f"not the partition {culture}/{task}")
    validate_synth_rows(rows)
    table = pa.Table.from_pylist([{c: r[c] for c in SYNTH_COLUMNS} for r in rows], schema=synth_schema())
    return store.write_table(table, *synth_file(culture, task))


def synth_cultures(store: Any) -> list[str]:
    """Cultures with a synth directory."""
    return [d.split("=", 1)[1] for d in store.listdir("synth") if d.startswith("culture=")]


def synth_tasks(store: Any, culture: str) -> list[str]:
    """Task partitions present under a culture's synth directory."""
    return [d.split("=", 1)[1] for d in store.listdir(*synth_dir(culture)) if d.startswith("task=")]


def synth_files(store: Any, culture: str | None = None, tasks: list[str] | None = None) -> list[str]:
    """Paths inside ``store.fs`` of the synth data files (all, one culture, or its ``tasks``);
    the writer's private files (``_stats/``, ``summary.json``, temporaries) are never included."""
    cultures = [culture] if culture else synth_cultures(store)
    paths = []
    for c in cultures:
        for t in (tasks if tasks is not None else synth_tasks(store, c)):
            if store.exists(*synth_file(c, t)):
                paths.append(store.fs_path(*synth_file(c, t)))
    return paths


def unreadable(store: Any, *parts: str) -> str | None:
    """Why the Parquet file at ``parts`` cannot be read (cut short, overwritten: its footer is
    gone); None when it can. A partition whose file exists but is unreadable is not done."""
    import pyarrow.parquet as pq

    try:
        with store.fs.open_input_file(store.fs_path(*parts)) as f:
            pq.read_metadata(f)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return f"{store.uri(*parts)}: {' '.join(str(e).split())[:200]}"
    return None


def read_synth(store: Any, culture: str | None = None, task: str | None = None,
               columns: list[str] | None = None) -> "pa.Table":
    """The synthesized rows (all, one culture, or one partition) as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in synth_files(store, culture, [task] if task else None):
        with store.fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    schema = synth_schema()
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()
