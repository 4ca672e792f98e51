"""Degradations (cm_ray.checks): counted per partition, shown by status, failing past a threshold,
and the degraded partition recomputed (with a new version) by the next run."""

from __future__ import annotations

import pytest

from cm_ray import checks
from cm_ray import fingerprints as FP
from cm_ray.config import load_config
from cm_ray.stages import STAGES, run_stage
from cm_ray.status import status_rows
from cm_ray.storage import ArtifactStore
from cm_ray import artifacts as A


def _fake_search(calls: list, fallback_for: set):
    """A search stage that writes each missing culture's result file (as the real stages do: a
    partition whose output exists is done) and reports the fallback it used."""

    def run(cfg, store, force=False, **kw):
        degr = []
        for c in cfg.cultures:
            if store.exists(*A.search_results_file(c)) and not force:
                continue
            store.write_bytes(b"{}", *A.search_results_file(c))
            calls.append(c)
            if c in fallback_for:
                degr.append(checks.degradation("search_fallback", c, 8, 8, "8 of 8 searches answered by bm25"))
        return {"degradations": degr}

    return run


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"root={tmp_path / 'root'}", "cultures=[GB, MX]"])


def test_a_degradation_past_its_threshold_fails_the_stage_naming_the_culture(cfg, monkeypatch):
    calls: list = []
    monkeypatch.setitem(STAGES, "search", _fake_search(calls, {"MX"}))
    store = ArtifactStore(cfg.root)
    with pytest.raises(checks.DegradedError) as e:
        run_stage("search", cfg, store)
    assert "MX" in str(e.value) and "GB" not in str(e.value) and "search_fallback 8/8" in str(e.value)
    manifest = store.read_manifest("search")
    assert [d["key"] for d in manifest["degraded"]] == ["MX"]
    st = status_rows(cfg, store)
    assert st["rows"]["MX"]["search"]["state"] == "failed"
    assert "search_fallback" in st["rows"]["MX"]["search"]["reason"]
    assert st["rows"]["GB"]["search"]["state"] == "done"
    # The next run recomputes MX only, under a new version (its readers are recomputed too).
    v_before = FP.Records(store).get("search")["MX"]["version"]
    calls.clear()
    monkeypatch.setitem(STAGES, "search", _fake_search(calls, set()))
    summary = run_stage("search", cfg, store)
    assert calls == ["MX"] and summary["recomputed"] == ["MX"]
    assert FP.Records(store).get("search")["MX"]["version"] != v_before
    assert status_rows(cfg, store)["rows"]["MX"]["search"]["state"] == "done"


def test_below_threshold_or_report_only_is_shown_by_status_and_does_not_fail(cfg, monkeypatch):
    calls: list = []
    monkeypatch.setitem(STAGES, "search", _fake_search(calls, {"MX"}))
    store = ArtifactStore(cfg.root)
    relaxed = cfg.model_copy(update={"checks": cfg.checks.replace(fail=False)})
    summary = run_stage("search", relaxed, store)
    assert [d["key"] for d in summary["degraded"]] == ["MX"]
    st = status_rows(relaxed, store)
    assert st["rows"]["MX"]["search"]["state"] == "failed"  # recorded, recomputed next time
    store2 = ArtifactStore(cfg.root + "2")
    lenient = cfg.model_copy(update={"checks": cfg.checks.replace(search_fallback=None)})
    summary = run_stage("search", lenient, store2)
    assert "degraded" not in summary
    st = status_rows(lenient, store2)
    assert st["rows"]["MX"]["search"]["state"] == "degraded"
    assert "8 of 8 searches answered by bm25" in st["rows"]["MX"]["search"]["reason"]
    assert st["totals"]["search"] == {"done": 1, "degraded": 1}


def test_unknown_kinds_and_thresholds_are_config_errors():
    with pytest.raises(KeyError, match="unknown degradation kind"):
        checks.degradation("nope", "MX", 1, 2)
    from cm_ray.config import ConfigError

    with pytest.raises(ConfigError, match="checks.search_fallback"):
        load_config(None, ["checks.search_fallback=2"])
    assert set(checks.KINDS) <= set(load_config(None).checks.model_fields)
