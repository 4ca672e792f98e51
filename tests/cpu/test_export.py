"""``cm-ray export``: the synthesized data as a Hugging Face dataset (one config per task, culture
a column) with a dataset card; the hub upload is built (one commit of every file) without sending.

python -m pytest tests/cpu/test_export.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cm_ray import artifacts as A
from cm_ray.storage import ArtifactStore
from cm_ray.tasks import load_task

REPO = Path(__file__).resolve().parents[2]


def _write(store, culture, task, n, n_val):
    spec = load_task(task)
    rows = []
    for i in range(n):
        ex = spec.examples[i % len(spec.examples)]
        rows.append(A.synth_row(culture=culture, task=task, split="validation" if i < n_val else "train",
                                sample={**ex, "n": i}, input=spec.render_input(ex), output=spec.render_output(ex),
                                messages=spec.messages(ex), snippet_urls=[f"https://news.{culture.lower()}.example/{i}",
                                                                          "https://www.wiki.example/x"],
                                engine="vllm", model="smollm2"))
    A.write_synth_partition(store, culture, task, rows)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cm_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_export_writes_a_dataset_per_task_with_a_card_and_builds_the_hub_commit(tmp_path):
    import datasets

    from cm_ray.export import hub_operations

    store = ArtifactStore(str(tmp_path / "run"))
    for c, n in {"GB": 5, "MX": 3}.items():
        _write(store, c, "offensive", n, 1)
        _write(store, c, "survey", 2, 0)
    _write(store, "CN", "offensive", 4, 0)  # not in the config: not exported
    store.write_json({"per_culture": {"GB": {"filters": {"dedup": {"in": 9, "out": 5}}},
                                      "MX": {"filters": {"dedup": {"in": 4, "out": 3}}}}}, *A.synth_summary_file())
    out = tmp_path / "export"
    args = ["configs/demo.yaml", f"root={store.root}", "cultures=[GB, MX]", "tasks=[offensive, survey]"]
    r = _cli("export", *args, "--to", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "12 rows, 2 configs (offensive, survey)" in r.stdout

    off = datasets.load_dataset(str(out), "offensive")
    assert sorted(off) == ["train", "validation"] and off["train"].num_rows == 6 and off["validation"].num_rows == 2
    assert sorted(set(off["train"]["culture"])) == ["GB", "MX"] and "split" not in off["train"].column_names
    assert off["train"][0]["messages"][0]["role"] in ("system", "user")
    survey = datasets.load_dataset(str(out), "survey")
    assert list(survey) == ["train"] and survey["train"].num_rows == 4

    card = (out / "README.md").read_text()
    assert "- config_name: offensive" in card and "path: offensive/validation-*.parquet" in card
    assert "| offensive | train | 4 | 2 | 6 |" in card and "| dedup | 13 | 8 | 5 |" in card
    assert "- vllm / smollm2: 12 samples" in card and "- www.wiki.example: 12" in card and "- news.gb.example: 7" in card
    assert "cultures: GB, MX" in card and "Generated 20" in card

    ops = hub_operations(out, json.loads(_cli("export", *args, "--to", str(tmp_path / "j"), "--json").stdout)["files"])
    assert sorted(o.path_in_repo for o in ops) == ["README.md", "offensive/train-00000-of-00001.parquet",
                                                    "offensive/validation-00000-of-00001.parquet",
                                                    "survey/train-00000-of-00001.parquet"]
    r = _cli("export", *args, "--to", str(tmp_path / "again"), "--push-to-hub", "me/data",
             env={"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""})
    assert r.returncode == 1 and "needs a Hugging Face token in HF_TOKEN" in r.stderr
    r = _cli("export", "configs/demo.yaml", f"root={tmp_path / 'empty'}", "--to", str(tmp_path / "none"))
    assert r.returncode == 1 and "no synthesized rows" in r.stderr and "run cm-ray synthesize first" in r.stderr
    assert json.loads(_cli("export", *args, "--to", str(out), "--json", "--overwrite").stdout)["rows"]["survey"]["train"] == \
        {"GB": 2, "MX": 2}


def _store_with_rows(tmp_path):
    store = ArtifactStore(str(tmp_path / "run"))
    _write(store, "GB", "offensive", 4, 1)
    _write(store, "MX", "survey", 3, 0)
    rows = [{**r, "snippet_urls": ["corpus://cm_ray/gb-01", "https://news.gb.example/1"]}
            for r in A.read_synth(store, "GB", "offensive").to_pylist()]
    A.write_synth_partition(store, "GB", "offensive", rows)
    cfg_args = ["configs/demo.yaml", f"root={store.root}", "cultures=[GB, MX]", "tasks=[offensive, survey]"]
    return store, cfg_args


def test_export_writes_only_into_a_new_or_empty_directory_outside_the_root(tmp_path):
    store, args = _store_with_rows(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "README.md").write_text("my own notes")
    r = _cli("export", *args, "--to", str(foreign))
    assert r.returncode == 2 and "not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert (foreign / "README.md").read_text() == "my own notes" and sorted(os.listdir(foreign)) == ["README.md"]
    r = _cli("export", *args, "--to", "")
    assert r.returncode == 2 and "--to: empty" in r.stderr and not (REPO / "offensive").exists()
    for inside in (Path(store.root) / "export", Path(store.root), tmp_path):
        r = _cli("export", *args, "--to", str(inside))
        assert r.returncode == 2 and "overlaps the artifact root" in r.stderr, (inside, r.stderr[-2000:])
    assert not (Path(store.root) / "export").exists() and not (Path(store.root) / "README.md").exists()
    (tmp_path / "empty").mkdir()
    assert _cli("export", *args, "--to", str(tmp_path / "empty")).returncode == 0


def test_overwrite_replaces_only_the_exports_files_and_push_uploads_only_them(tmp_path):
    from huggingface_hub import HfApi

    from cm_ray.config import load_config
    from cm_ray.export import build_export, push_to_hub

    store, args = _store_with_rows(tmp_path)
    out = tmp_path / "out"
    (out / "offensive").mkdir(parents=True)
    (out / "secrets.env").write_text("HF_TOKEN=hf_private")
    (out / "offensive" / "notes.txt").write_text("keep me")
    card = build_export(load_config(args[0], args[1:]), store, out, overwrite=True)
    assert card["files"] == ["README.md", "offensive/train-00000-of-00001.parquet",
                             "offensive/validation-00000-of-00001.parquet", "survey/train-00000-of-00001.parquet"]
    assert (out / "secrets.env").read_text() == "HF_TOKEN=hf_private"
    assert (out / "offensive" / "notes.txt").read_text() == "keep me"

    class RecordingApi(HfApi):  # the real client; what it would send is recorded instead
        sent: list = []

        def create_repo(self, *a, **kw):
            return None

        def create_commit(self, repo_id, operations, **kw):
            self.sent.append((repo_id, [(o.path_in_repo, o.path_or_fileobj) for o in operations], kw))
            return "https://huggingface.co/datasets/me/data/commit/0"

    api = RecordingApi(token="hf_unused")
    push_to_hub(out, "me/data", card["files"], api=api)
    [(repo, ops, kw)] = api.sent
    assert repo == "me/data" and kw["repo_type"] == "dataset"
    assert [p for p, _ in ops] == card["files"] and all(Path(f).is_file() for _, f in ops)
    assert not any("secrets" in p or "notes" in p for p, _ in ops)


def test_the_dataset_card_metadata_is_what_the_hub_accepts(tmp_path):
    import datasets.utils.metadata as dm
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    store, args = _store_with_rows(tmp_path)
    out = tmp_path / "out"
    r = _cli("export", *args, "--to", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    card = DatasetCard.load(out / "README.md", repo_type="dataset")
    data = card.data
    assert isinstance(data, DatasetCardData)
    resources = Path(dm.__file__).parent / "resources"
    languages = json.loads((resources / "languages.json").read_text())
    assert data.license == "other" and data.language and set(data.language) <= set(languages)
    assert data.language == ["en"]  # the samples are English
    assert set(data.task_categories) == {"text-classification", "multiple-choice", "text-generation"}
    assert set(data.task_categories) <= set(dm.known_task_ids)
    assert set(data.size_categories) <= set(json.loads((resources / "size_categories.json").read_text()))
    assert data.multilinguality in json.loads((resources / "multilingualities.json").read_text())
    creators = json.loads((resources / "creators.json").read_text())
    assert set(data.annotations_creators) <= set(creators["annotations"])
    assert set(data.language_creators) <= set(creators["language"])
    assert sorted(MetadataConfigs.from_dataset_card_data(data)) == ["offensive", "survey"]
    text = (out / "README.md").read_text()
    sources = text.split("## Sources", 1)[1]
    assert "- news.gb.example: 4" in sources and "cm_ray:" not in sources.split("## Corpus sources")[0]
    assert "## Corpus sources (offline passages, not web pages)" in text and "- corpus://cm_ray: 4 citations" in text
