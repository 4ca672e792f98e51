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
