"""``cm-ray export CONFIG --to DIR [--push-to-hub REPO]``: the synthesized data as a Hugging Face
``datasets`` dataset, one config per task (culture a column), with a dataset card.

    DIR/README.md                         dataset card (YAML header: configs, license, tasks, languages)
    DIR/<task>/<split>-00000-of-00001.parquet

``DIR`` must be new or empty and lie outside the artifact root; ``--overwrite`` lets it hold other
files, which are left alone (only the export's own files are replaced). ``datasets.load_dataset(DIR,
"<task>")`` reads it back; ``--push-to-hub`` uploads exactly the files this export wrote as one
commit to a dataset repo with the token in ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``). A synth
partition that cannot be read is an error naming its file.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from cm_ray import artifacts as A

DROP = ("split",)
"""Columns not exported (the split is the dataset's split)."""
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
TASK_CATEGORIES = {"classification": "text-classification", "survey": "multiple-choice",
                   "multiple_choice": "multiple-choice", "short_answer": "question-answering",
                   "open_ended": "text-generation"}
"""Task spec kind -> Hub task category (every sample is also a chat for text generation)."""
WEB = ("http", "https")
"""URL schemes of web sources; others (``corpus://<corpus>/<id>``) are offline corpus passages."""


class ExportTargetError(ValueError):
    """``--to`` names a place the export must not write to."""


def check_target(out_dir: str | Path, root: str, overwrite: bool = False) -> Path:
    """The export directory, refused when it is empty text, a file, not empty (unless
    ``overwrite``), or overlaps the artifact root (never, even with ``overwrite``)."""
    if not str(out_dir).strip():
        raise ExportTargetError("--to: empty: name a new or empty directory")
    out = Path(out_dir).expanduser().resolve()
    if "://" not in root:
        store = Path(root).resolve()
        if out == store or store in out.parents or out in store.parents:
            raise ExportTargetError(f"--to {out}: overlaps the artifact root {store}: export outside it")
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"--to {out}: is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportTargetError(f"--to {out}: not empty: name a new or empty directory, or pass "
                                f"--overwrite to replace only the export's own files there")
    return out


def _filters(store) -> dict:
    """Each filter's rows in / out / dropped, summed over cultures (``synth/summary.json``)."""
    parts = A.synth_summary_file()
    summary = store.read_json(*parts) if store.exists(*parts) else {}
    total: dict[str, Counter] = {}
    for entry in (summary.get("per_culture") or {}).values():
        for name, f in (entry.get("filters") or {}).items():
            c = total.setdefault(name, Counter())
            c["in"] += f.get("in", 0)
            c["out"] += f.get("out", 0)
    return {k: {"in": v["in"], "out": v["out"], "dropped": v["in"] - v["out"]} for k, v in total.items()}


def _read(store, cultures: list[str], task: str):
    """One task's rows of ``cultures`` (in that order) as one Arrow table."""
    import pyarrow as pa

    from cm_ray.storage import UnreadableRecord

    tables = []
    for c in cultures:
        if A.synth_files(store, c, [task]):
            try:
                tables.append(A.read_synth(store, c, task))
            except (OSError, ValueError) as e:  # cut short or overwritten: name it, never a traceback
                raise UnreadableRecord(store.uri(*A.synth_file(c, task)), "synth partition",
                                       f"{' '.join(str(e).split())[:200]}; cm-ray synthesize recomputes it") from None
    return pa.concat_tables(tables) if tables else A.synth_schema().empty_table()


def build_export(cfg, store, out_dir: str | Path, overwrite: bool = False, license: str = "other") -> dict:
    """Write the dataset and its card under ``out_dir`` (``check_target``); returns what the card
    says (as data), with ``files``: the paths it wrote, relative to ``out_dir``."""
    import datasets
    from datasets.table import InMemoryTable

    from cm_ray.tasks import load_task

    out = check_target(out_dir, store.root, overwrite)
    counts: dict[str, dict] = {}
    engines, domains, corpora, kinds, langs = Counter(), Counter(), Counter(), set(), Counter()
    tables = {}
    for t in cfg.tasks:
        spec = load_task(t)
        table = _read(store, cfg.cultures, spec.name)
        if table.num_rows:
            tables[spec.name] = table
            kinds.add(spec.kind)
    if not tables:
        raise FileNotFoundError(f"no synthesized rows for {', '.join(cfg.cultures)} under "
                                f"{store.uri(*A.synth_dir())}: run cm-ray synthesize first")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for task, table in tables.items():
        counts[task] = {}
        rows = table.select(["split", "culture", "engine", "model", "snippet_urls", "input", "output"]).to_pylist()
        engines.update(f"{r['engine']} / {r['model']}" for r in rows)
        for u in (u for r in rows for u in r["snippet_urls"] or []):
            parts = urlsplit(u)
            if parts.scheme in WEB and parts.netloc:
                domains[parts.netloc] += 1
            elif parts.scheme:
                corpora[f"{parts.scheme}://{parts.netloc}"] += 1
        langs.update(_language(f"{r['input']}\n{r['output']}") for r in rows)
        for split in ("train", "validation"):
            mask = [r["split"] == split for r in rows]
            if not any(mask):
                continue
            import pyarrow as pa

            part = table.filter(pa.array(mask)).drop_columns(list(DROP))
            path = out / task / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset(InMemoryTable(part), split=split).to_parquet(str(path))
            files.append(path.relative_to(out).as_posix())
            counts[task][split] = dict(Counter(c for c, m in zip(table.column("culture").to_pylist(), mask) if m))
    total = sum(langs.values())
    card = {"name": cfg.name, "recipe": cfg.recipe, "cultures": list(cfg.cultures), "tasks": list(counts),
            "rows": counts, "filters": _filters(store), "engines": dict(engines.most_common()),
            "domains": dict(domains.most_common(20)), "n_domains": len(domains), "corpora": dict(corpora),
            "license": license, "task_categories": sorted({TASK_CATEGORIES[k] for k in kinds} | {"text-generation"}),
            "language": [lang for lang, n in langs.most_common() if n >= 0.05 * total] or ["en"],
            "generated": _generated(store), "source": store.root}
    (out / "README.md").write_text(dataset_card(card), encoding="utf-8")
    card["files"] = sorted(["README.md", *files])
    return card


def _language(text: str) -> str:
    """The ISO 639-1 code of a sample's language (py3langid)."""
    import py3langid

    return py3langid.classify(text)[0]


def _size_category(n: int) -> str:
    return "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"


def _generated(store) -> str:
    """The UTC date the newest synth partition was written."""
    times = [store.fs.get_file_info(p).mtime for p in A.synth_files(store)]
    newest = max((t.timestamp() for t in times if t is not None), default=time.time())
    return time.strftime("%Y-%m-%d", time.gmtime(newest))


def dataset_card(card: dict) -> str:
    """README.md of the exported dataset: the YAML header of its configs, then the facts."""
    import yaml

    total = sum(n for splits in card["rows"].values() for per in splits.values() for n in per.values())
    meta = {"license": card["license"], "language": card["language"], "task_categories": card["task_categories"],
            "multilinguality": "multilingual" if len(card["language"]) > 1 else "monolingual",
            "size_categories": [_size_category(total)], "annotations_creators": ["machine-generated"],
            "language_creators": ["machine-generated"], "source_datasets": ["original"],
            "pretty_name": f"{card['name']} ({card['recipe']})", "tags": ["synthetic", "culture"],
            "configs": [{"config_name": task, "data_files": [{"split": s, "path": f"{task}/{s}-*.parquet"}
                                                             for s in splits]} for task, splits in card["rows"].items()]}
    head = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    body = [f"# {card['name']}: culture-specific synthetic data ({card['recipe']})", "",
            f"{total} samples, {len(card['tasks'])} tasks (one config each, `culture` is a column), "
            f"{len(card['cultures'])} cultures: {', '.join(card['cultures'])}. Generated {card['generated']}.",
            "", "## Rows", "", "| task | split | " + " | ".join(card["cultures"]) + " | total |",
            "|" + "---|" * (len(card["cultures"]) + 3)]
    for task, splits in card["rows"].items():
        for s, per in splits.items():
            body.append(f"| {task} | {s} | " + " | ".join(str(per.get(c, 0)) for c in card["cultures"])
                        + f" | {sum(per.values())} |")
    body += ["", "## Filters", "", "| filter | in | kept | dropped |", "|---|---|---|---|"]
    body += [f"| {k} | {v['in']} | {v['out']} | {v['dropped']} |" for k, v in card["filters"].items()]
    body += ["", "## Generation", ""] + [f"- {k}: {n} samples" for k, n in card["engines"].items()]
    body += ["", f"## Sources ({card['n_domains']} web domains; the most cited)", ""]
    body += [f"- {d}: {n}" for d, n in card["domains"].items()] or ["- none recorded"]
    if card.get("corpora"):
        body += ["", "## Corpus sources (offline passages, not web pages)", ""]
        body += [f"- {c}: {n} citations" for c, n in card["corpora"].items()]
    return "\n".join(head + body) + "\n"


def hub_operations(out_dir: str | Path, files: list[str]) -> list:
    """The commit that uploads ``files`` (what the export wrote, relative to ``out_dir``): one
    ``CommitOperationAdd`` each; nothing else in ``out_dir`` is sent (nothing sent here)."""
    from huggingface_hub import CommitOperationAdd

    root = Path(out_dir)
    return [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in sorted(files)]


def hub_token() -> str:
    for name in TOKEN_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise RuntimeError(f"--push-to-hub needs a Hugging Face token in {' or '.join(TOKEN_ENVS)}")


def push_to_hub(out_dir: str | Path, repo: str, files: list[str], api=None) -> str:
    """Create the dataset repo if needed and upload the export's ``files`` as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=hub_token())
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    info = api.create_commit(repo, operations=hub_operations(out_dir, files), repo_type="dataset",
                             commit_message="cm_ray export")
    return str(getattr(info, "commit_url", info))
