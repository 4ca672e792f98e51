"""``cm-ray export CONFIG --to DIR [--push-to-hub REPO]``: the synthesized data as a Hugging Face
``datasets`` dataset, one config per task (culture a column), with a dataset card.

    DIR/README.md                         dataset card (YAML header names each config's files)
    DIR/<task>/<split>-00000-of-00001.parquet

``datasets.load_dataset(DIR, "<task>")`` reads it back; ``--push-to-hub`` uploads the same folder
as one commit to a dataset repo with the token in ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``).
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

    tables = [A.read_synth(store, c, task) for c in cultures if A.synth_files(store, c, [task])]
    return pa.concat_tables(tables) if tables else A.synth_schema().empty_table()


def build_export(cfg, store, out_dir: str | Path) -> dict:
    """Write the dataset and its card under ``out_dir``; returns what the card says (as data)."""
    import datasets
    from datasets.table import InMemoryTable

    from cm_ray.tasks import load_task

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict] = {}
    engines, domains = Counter(), Counter()
    for t in cfg.tasks:
        task = load_task(t).name
        table = _read(store, cfg.cultures, task)
        if table.num_rows == 0:
            continue
        counts[task] = {}
        rows = table.select(["split", "culture", "engine", "model", "snippet_urls"]).to_pylist()
        engines.update(f"{r['engine']} / {r['model']}" for r in rows)
        domains.update(urlsplit(u).netloc for r in rows for u in r["snippet_urls"] or [] if urlsplit(u).netloc)
        for split in ("train", "validation"):
            mask = [r["split"] == split for r in rows]
            if not any(mask):
                continue
            import pyarrow as pa

            part = table.filter(pa.array(mask)).drop_columns(list(DROP))
            path = out / task / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset(InMemoryTable(part), split=split).to_parquet(str(path))
            counts[task][split] = dict(Counter(c for c, m in zip(table.column("culture").to_pylist(), mask) if m))
    if not counts:
        raise FileNotFoundError(f"no synthesized rows for {', '.join(cfg.cultures)} under "
                                f"{store.uri(*A.synth_dir())}: run cm-ray synthesize first")
    card = {"name": cfg.name, "recipe": cfg.recipe, "cultures": list(cfg.cultures), "tasks": list(counts),
            "rows": counts, "filters": _filters(store), "engines": dict(engines.most_common()),
            "domains": dict(domains.most_common(20)), "n_domains": len(domains),
            "generated": _generated(store), "source": store.root}
    (out / "README.md").write_text(dataset_card(card))
    return card


def _generated(store) -> str:
    """The UTC date the newest synth partition was written."""
    times = [store.fs.get_file_info(p).mtime for p in A.synth_files(store)]
    newest = max((t.timestamp() for t in times if t is not None), default=time.time())
    return time.strftime("%Y-%m-%d", time.gmtime(newest))


def dataset_card(card: dict) -> str:
    """README.md of the exported dataset: the YAML header of its configs, then the facts."""
    head = ["---", "configs:"]
    for task, splits in card["rows"].items():
        head += [f"- config_name: {task}", "  data_files:"]
        head += [f"  - split: {s}\n    path: {task}/{s}-*.parquet" for s in splits]
    head += ["tags:", "- synthetic", "- culture", "---", ""]
    total = sum(n for splits in card["rows"].values() for per in splits.values() for n in per.values())
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
    return "\n".join(head + body) + "\n"


def hub_operations(out_dir: str | Path) -> list:
    """The commit that uploads ``out_dir``: one ``CommitOperationAdd`` per file (nothing sent)."""
    from huggingface_hub import CommitOperationAdd

    root = Path(out_dir)
    return [CommitOperationAdd(path_in_repo=p.relative_to(root).as_posix(), path_or_fileobj=str(p))
            for p in sorted(root.rglob("*")) if p.is_file()]


def hub_token() -> str:
    for name in TOKEN_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise RuntimeError(f"--push-to-hub needs a Hugging Face token in {' or '.join(TOKEN_ENVS)}")


def push_to_hub(out_dir: str | Path, repo: str, api=None) -> str:
    """Create the dataset repo if needed and upload ``out_dir`` as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=hub_token())
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    info = api.create_commit(repo, operations=hub_operations(out_dir), repo_type="dataset",
                             commit_message="cm_ray export")
    return str(getattr(info, "commit_url", info))
