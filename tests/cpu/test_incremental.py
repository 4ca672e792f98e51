"""Incremental reruns: every partition records what it was computed from, a rerun redoes only
what is missing or changed (plus what reads it), and says why.

python -m pytest tests/cpu/test_incremental.py -q

* fingerprints (pure): a changed field makes exactly the partitions that read it stale, with the
  field and both values in the reason; a recomputed upstream partition makes its readers stale;
  speed-only settings change nothing;
* for real (Ray Tune + Ray Train + DeepSpeed, tiny Llama, packed trials as in configs/demo.yaml,
  the router's encoder): a finished GB + MX run, then CN added -> only CN's adapter is trained and
  the router refit; GB's and MX's published versions and pointer files are untouched; a third run
  skips both stages; serving warns by name about an adapter made stale by a changed field.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/cm_ray/torch_extensions")

from cm_ray import artifacts as A  # noqa: E402
from cm_ray import fingerprints as FP  # noqa: E402
from cm_ray.config import load_config  # noqa: E402
from cm_ray.storage import ArtifactStore  # noqa: E402
from tests.cpu.test_train_pack import write_rows  # noqa: E402


def _states(stage, cfg, store):
    return {p.key: (p.state, p.reason) for p in FP.plan(stage, cfg, store)}


def _write(store, stage, keys):
    """The outputs a data stage writes for ``keys`` (minimal rows)."""
    for k in keys:
        if stage == "synthesize":
            c, t = k.split("/")
            write_rows(store, c, 3, task=t)
        else:
            f = A.queries_file if stage == "queries" else A.search_results_file
            store.write_table([{"query_id": "q", "culture": k}], *f(k))


def test_changed_fields_and_recomputed_inputs_make_exactly_their_readers_stale(tmp_path):
    store = ArtifactStore(str(tmp_path))
    cfg = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive, survey]"])
    lines: list[str] = []
    for stage in ("queries", "search", "synthesize"):  # as run_stage does: record, compute, finish
        todo = FP.prepare(stage, cfg, store, log=lines.append)
        assert {p.state for p in todo} == {"missing"}
        _write(store, stage, [p.key for p in todo])
        FP.finish(stage, store, todo, {})
    assert "synthesize: 4 of 4 partitions to compute" in lines and "  MX/offensive: missing" in lines
    for stage in ("queries", "search", "synthesize"):
        assert {s for s, _ in _states(stage, cfg, store).values()} == {"done"}, stage

    # A synthesis field: every synth partition, with the field and both values; nothing upstream.
    more = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive, survey]",
                              "synthesis.prompts_per_pair=4"])
    got = _states("synthesize", more, store)
    assert got["MX/offensive"] == ("stale", "synthesis.prompts_per_pair 2 -> 4")
    assert {s for s, _ in got.values()} == {"stale"}
    assert {s for s, _ in _states("search", more, store).values()} == {"done"}
    # Speed-only settings are not inputs.
    fast = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive, survey]",
                              "synthesis.batch_size=32", "search.concurrency=8", "search.qps=50"])
    for stage in ("queries", "search", "synthesize"):
        assert {s for s, _ in _states(stage, fast, store).values()} == {"done"}, stage

    # A search field for one stage only; MX's search redone -> MX's synthesis (both tasks) stale.
    got = _states("search", load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "search.top_k=9"]), store)
    assert got["GB"] == ("stale", "search.top_k 5 -> 9")
    only_mx = load_config(None, [f"root={tmp_path}", "cultures=[MX]", "tasks=[offensive, survey]"])
    todo = FP.prepare("search", only_mx, store, force=True, log=lines.append)
    _write(store, "search", ["MX"])
    FP.finish("search", store, todo, {})
    got = _states("synthesize", cfg, store)
    assert got["MX/offensive"] == ("stale", "input search/MX recomputed") and got["MX/survey"][0] == "stale"
    assert got["GB/offensive"][0] == got["GB/survey"][0] == "done"
    # A stale partition's old output is deleted before the stage computes it.
    FP.prepare("synthesize", cfg, store, log=lines.append)
    assert not store.exists(*A.synth_file("MX", "offensive")) and store.exists(*A.synth_file("GB", "offensive"))

    # A task given by its YAML path is the same partition as the task by name.
    by_path = load_config(None, [f"root={tmp_path}", "cultures=[GB]",
                                 f"tasks=[{A.__file__.rsplit('/', 1)[0]}/tasks/offensive.yaml, survey]"])
    assert _states("synthesize", by_path, store)["GB/offensive"][0] == "done"


def _cfg(root, model_dir, *overrides):
    return load_config(None, [f"root={root}", f"models.base={model_dir}", "tasks=[offensive]",
                              "train.target_modules=[all-linear]", "train.epochs=1", "train.batch_size=2",
                              "train.max_seq_len=128", "train.joint_baseline=false", "train.trials=packed",
                              "train.packs=1", "router.kind=embedding", *overrides])


def _adapter_state(store, name):
    where, version = A.published_adapter(store, name)
    pointer = store.fs.get_file_info(store.fs_path(*A.adapter_dir(name), "current.json"))
    return version, pointer.mtime_ns, store.read_json(*where, "metrics.json")["run_name"]


@pytest.mark.slow
def test_adding_a_culture_trains_only_its_adapter_and_refits_the_router(ray_local, tmp_path, tiny_model_dir, capfd):
    from cm_ray.stages import run_stage

    store = ArtifactStore(str(tmp_path / "run"))
    for c in ("GB", "MX"):
        write_rows(store, c, 8)
    first = _cfg(store.root, tiny_model_dir, "cultures=[GB, MX]")
    s = run_stage("train", first, store)
    assert s["trained"] == ["GB", "MX"] and s["recomputed"] == ["GB", "MX"]
    r = run_stage("route", first, store)
    assert r["cultures"] == 2
    before = {c: _adapter_state(store, c) for c in ("GB", "MX")}
    router_before = A.published_router(store)[1]

    write_rows(store, "CN", 8)
    grown = _cfg(store.root, tiny_model_dir, "cultures=[GB, MX, CN]")
    capfd.readouterr()
    s = run_stage("train", grown, store)
    assert s["trained"] == ["CN"] and s["recomputed"] == ["CN"] and sorted(s["skipped"]) == ["GB", "MX"]
    assert "train: 1 of 3 partitions to compute" in capfd.readouterr().err
    assert {c: _adapter_state(store, c) for c in ("GB", "MX")} == before  # same versions, same pointer files
    assert A.published_adapter(store, "CN") is not None
    r = run_stage("route", grown, store)
    assert r["cultures"] == 3 and r["recomputed"] == ["router"] and A.published_router(store)[1] != router_before
    err = capfd.readouterr().err
    assert "router: input synthesize/CN/offensive added" in err, err[-2000:]

    again = {st: run_stage(st, grown, store) for st in ("train", "route")}
    assert all(v.get("skipped") for v in again.values()), again
    # A changed training field: every adapter is stale, by name and field; serving would warn.
    lines = FP.stale_warnings(_cfg(store.root, tiny_model_dir, "cultures=[GB, MX, CN]", "train.lora_r=4"), store)
    assert "stale adapter GB: train.lora_r 8 -> 4" in lines and len(lines) == 3, lines


def test_status_table_and_json_say_done_stale_missing_failed(tmp_path):
    import json
    import subprocess
    import sys

    from cm_ray.status import status_rows

    store = ArtifactStore(str(tmp_path))
    args = [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive]", "train.joint_baseline=false"]
    demo = str(A.__file__).rsplit("/cm_ray/", 1)[0] + "/configs/demo.yaml"
    cfg = load_config(demo, args)
    done = {"queries": ["GB", "MX"], "search": ["GB"], "synthesize": ["GB/offensive"], "train": []}
    for stage, keys in done.items():
        todo = FP.prepare(stage, cfg, store, log=lambda _: None)
        _write(store, stage, keys)
        FP.finish(stage, store, todo, {"failed": {"GB": "ValueError: no usable rows"}} if stage == "train" else {})
    st = status_rows(load_config(demo, [*args, "queries.n_agnostic=5"]), store)
    gb, mx = st["rows"]["GB"], st["rows"]["MX"]
    assert gb["queries"] == {"state": "stale", "reason": "queries.n_agnostic 2 -> 5",
                             "parts": {"GB": {"state": "stale", "reason": "queries.n_agnostic 2 -> 5"}}}
    assert gb["search"]["state"] == "done" and gb["synthesize"]["state"] == "done"
    assert gb["train"] == {"state": "failed", "reason": "ValueError: no usable rows",
                           "parts": {"GB": {"state": "failed", "reason": "ValueError: no usable rows"}}}
    assert mx["search"]["state"] == "missing" and st["rows"]["router"]["route"]["state"] == "missing"
    assert st["totals"]["queries"] == {"stale": 2} and st["totals"]["search"] == {"done": 1, "missing": 1}
    assert st["root"] == str(tmp_path)

    env = {**os.environ, "PYTHONPATH": str(A.__file__).rsplit("/cm_ray/", 1)[0]}
    run = lambda *extra: subprocess.run([sys.executable, "-m", "cm_ray.cli", "status", demo, *args,
                                         "queries.n_agnostic=5", *extra], capture_output=True, text=True, env=env,
                                        timeout=120)
    r = run()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    gb_line = next(ln for ln in lines if ln.startswith("GB "))
    assert "stale: queries.n_agnostic 2 -> 5" in gb_line and "failed: ValueError" in gb_line
    assert "  search      1/2 done, 1 missing" in lines and lines[-1] == f"store: {tmp_path}"
    r = run("--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"]["MX"]["search"]["state"] == "missing"


def test_a_task_given_by_yaml_path_is_trained_from_its_partitions(tmp_path):
    from pathlib import Path

    from cm_ray.train.tune import _phase_sources, has_data

    shipped = Path(A.__file__).parent / "tasks" / "offensive.yaml"
    custom = tmp_path / "my_offence.yaml"
    custom.write_text(shipped.read_text().replace("name: offensive", "name: my_offence", 1))
    store = ArtifactStore(str(tmp_path / "run"))
    from cm_ray.tasks import load_task

    spec = load_task(str(custom))
    rows = [A.synth_row(culture="GB", task=spec.name, split="train", sample=ex, input=spec.render_input(ex),
                        output=spec.render_output(ex), messages=spec.messages(ex)) for ex in spec.examples]
    A.write_synth_partition(store, "GB", spec.name, rows)  # partitions are named by the spec's name
    assert store.exists(*A.synth_file("GB", "my_offence"))
    for mode in ("per_culture", "continual"):
        cfg = load_config(None, [f"root={store.root}", "cultures=[GB]", f"tasks=[{custom}]", f"train.mode={mode}",
                                 *([f"train.continual_first=[{custom}]"] if mode == "continual" else [])])
        assert _phase_sources(cfg, store, "GB") == [[("GB", ["my_offence"])]] and has_data(cfg, store, "GB")
    assert [p.key for p in FP.stage_parts("synthesize", cfg)] == ["GB/my_offence"]


def test_progress_lines_say_done_total_rows_elapsed_eta_and_each_finished_trial(capsys):
    from cm_ray.progress import stage_bar, trial_line

    bar = stage_bar("synthesize", 4, "partition")
    for i in range(4):
        bar.set_postfix_str(f"{(i + 1) * 10} rows kept, last GB/t{i}", refresh=False)
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "synthesize: 4/4 partitions, 40 rows kept, last GB/t3 [" in err and "elapsed, ETA" in err
    assert trial_line({"adapter": "GB"}, {"loss": 1.23456, "step": 40}, None, 2, 5) == \
        "train 2/5 GB: loss 1.235 at step 40"
    assert trial_line({"unit": {"pack": 0, "adapters": ["GB", "MX"]}}, {}, None, 1, 1) == "train 1/1 GB,MX: finished"
    assert trial_line({"unit": {"adapter": "_joint"}}, None, RuntimeError("boom\nValueError: bad rows"), 1, 2) == \
        "train 1/2 _joint: failed: ValueError: bad rows"


def test_a_root_from_before_fingerprints_is_adopted_not_redone(tmp_path):
    store = ArtifactStore(str(tmp_path))
    cfg = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]"])
    _write(store, "queries", ["GB"])  # outputs, no record file: an older run's
    lines: list[str] = []
    todo = FP.prepare("queries", cfg, store, log=lines.append)
    assert [p.key for p in todo] == ["MX"] and store.exists(*A.queries_file("GB"))
    assert lines[0] == "queries: 1 partitions written before fingerprints taken as current"
    assert _states("queries", cfg, store)["GB"] == ("done", "")
    changed = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "queries.n_specific=1"])
    assert _states("queries", changed, store)["GB"] == ("stale", "queries.n_specific 3 -> 1")


def test_evaluation_cells_follow_their_adapters_and_router(tmp_path):
    store = ArtifactStore(str(tmp_path))
    args = [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive]", "train.joint_baseline=false"]
    cfg = load_config(None, args)

    def published(stage, cfg, **kw):  # the records run_stage leaves once the outputs are published
        FP.prepare(stage, cfg, store, log=lambda _: None, **kw)
        records = FP.Records(store)
        for rec in records.get(stage).values():
            rec["complete"] = True
        records.save(stage)

    for stage in ("train", "route"):
        published(stage, cfg)
    FP.finish("evaluate", store, FP.prepare("evaluate", cfg, store, log=lambda _: None), {})
    assert set(_states("evaluate", cfg, store).values()) == {("missing", "missing")}  # no results yet
    todo = FP.prepare("evaluate", cfg, store, log=lambda _: None)
    store.write_json({"rows": []}, *A.eval_dir("results.json"))
    FP.finish("evaluate", store, todo, {})
    assert {s for s, _ in _states("evaluate", cfg, store).values()} == {"done"}
    # Speed-only settings change nothing; what is measured does, with the field named.
    assert {s for s, _ in _states("evaluate", load_config(None, [*args, "evaluate.workers=2"]), store).values()} == {"done"}
    assert _states("evaluate", load_config(None, [*args, "evaluate.max_questions=7"]), store)["GB"][1].startswith(
        "evaluate.max_questions ")
    # Adapters retrained: every cell whose systems read one (the router's systems read all).
    published("train", cfg, force=True)  # both adapters retrained
    states = _states("evaluate", cfg, store)
    assert states["GB"] == ("stale", "inputs train/GB, train/MX recomputed") and states["MX"][0] == "stale"
    only_oracle = load_config(None, [*args, "evaluate.systems=[base, oracle]"])
    FP.finish("evaluate", store, FP.prepare("evaluate", only_oracle, store, log=lambda _: None), {})
    store.write_json({"rows": []}, *A.eval_dir("results.json"))
    records = FP.Records(store)  # GB's adapter alone retrained (a new version, published)
    records.get("train")["GB"].update(version="v-new", complete=True)
    records.save("train")
    states = _states("evaluate", only_oracle, store)
    assert states["GB"] == ("stale", "input train/GB recomputed") and states["MX"][0] == "done"  # oracle: own adapter


def _data_run(store, cfg):
    for stage in ("queries", "search", "synthesize"):
        todo = FP.prepare(stage, cfg, store, log=lambda _: None)
        _write(store, stage, [p.key for p in todo])
        FP.finish(stage, store, todo, {})


@pytest.mark.parametrize("damage", [b'{"GB/offensive": {"fp": "', b"", b"[1, 2]", b"\xff\xfe"])
def test_a_fingerprint_record_that_does_not_parse_is_an_error_naming_it_not_a_deletion(tmp_path, damage):
    from cm_ray.storage import UnreadableRecord

    store = ArtifactStore(str(tmp_path))
    cfg = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive]"])
    _data_run(store, cfg)
    store.write_bytes(damage, *A.fingerprints_file("synthesize"))  # cut short, emptied, overwritten
    with pytest.raises(UnreadableRecord, match=r"manifests/fingerprints/synthesize\.json: unreadable"):
        FP.prepare("synthesize", cfg, store, log=lambda _: None)
    with pytest.raises(UnreadableRecord, match=r"fingerprints/synthesize\.json"):
        FP.plan("train", cfg, store)  # a reader of its versions too
    assert store.exists(*A.synth_file("GB", "offensive")) and store.exists(*A.synth_file("MX", "offensive"))
    assert store.read_bytes(*A.fingerprints_file("synthesize")) == damage  # left for a person to repair


def test_a_truncated_synth_partition_is_failed_unreadable_and_recomputed(tmp_path):
    from cm_ray.status import status_rows

    store = ArtifactStore(str(tmp_path))
    cfg = load_config(None, [f"root={tmp_path}", "cultures=[GB, MX]", "tasks=[offensive]"])
    _data_run(store, cfg)
    whole = store.read_bytes(*A.synth_file("MX", "offensive"))
    store.write_bytes(whole[: len(whole) // 2], *A.synth_file("MX", "offensive"))  # a copy cut short
    cell = status_rows(cfg, store)["rows"]["MX"]["synthesize"]
    assert cell["state"] == "failed" and cell["reason"].startswith("offensive: unreadable: ") and "task=offensive" in cell["reason"]
    assert status_rows(cfg, store)["rows"]["GB"]["synthesize"]["state"] == "done"
    todo = FP.prepare("synthesize", cfg, store, log=lambda _: None)  # the next run: MX deleted, redone
    assert [p.key for p in todo] == ["MX/offensive"] and not store.exists(*A.synth_file("MX", "offensive"))
