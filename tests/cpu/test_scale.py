"""The scale config and the scale / estimate benches' arithmetic (nothing is timed here).

python -m pytest tests/cpu/test_scale.py -q
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cm_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_scale_config_lists_200_distinct_registry_cultures_with_locales():
    from cm_ray.cultures import get_culture, registry

    cfg = load_config(REPO / "configs" / "scale.yaml")
    assert len(cfg.cultures) == 200 and len(set(cfg.cultures)) == 200
    assert set(cfg.cultures) <= set(registry())
    assert all(get_culture(c).locale for c in cfg.cultures)
    assert cfg.cultures[:3] == ["GB", "CN", "MX"]  # the cultures with corpus passages come first
    assert "NO" in cfg.cultures  # quoted in the YAML: a bare NO would load as false
    # Serve must hold fewer adapters than the bench trains, or LRU eviction is never exercised.
    assert cfg.serve.max_adapters_per_replica < 6
    assert cfg.train.joint_baseline is False and cfg.train.max_steps > 0


@pytest.mark.parametrize("n,k", [(200, 6), (10, 6), (50, 1), (7, 7), (5, 0), (5, 9)])
def test_spread_picks_k_distinct_cultures_across_the_whole_list(n, k):
    scale = _bench("scale")
    items = [f"c{i}" for i in range(n)]
    got = scale.spread(items, k)
    assert len(got) == (n if k <= 0 or k >= n else k)
    assert len(set(got)) == len(got) and got[0] == items[0]
    if 1 < k < n:
        assert got[-1] == items[-1]


def test_per_culture_seconds_divides_each_stage_by_its_own_culture_count():
    scale = _bench("scale")
    seconds = {"queries": 20.0, "train": 60.0, "serve": 30.0}
    assert scale.per_culture_seconds(seconds, {"queries": 10, "train": 6}) == pytest.approx(2.0 + 10.0)


def _results(**figs):
    return {bench: {"figures": f, "machine": "test", "date": "-"} for bench, f in figs.items()}


PRICES = {"gpus": 8, "gpu_hour_usd": 2.0, "cpu_node_hour_usd": 1.0, "search_per_1k_usd": 5.0,
          "serve_rps": 10.0}


def test_estimate_marks_gpu_stages_unavailable_without_measured_figures():
    est = _bench("estimate").estimate(load_config(REPO / "configs" / "paper.yaml"),
                                      _results(search={"qps_ratio": 0.5, "p50_ms": 50.0},
                                               train={"tokens_per_s_cpu": 400.0}), PRICES)
    rows = {r["stage"]: r for r in est["rows"]}
    for stage in ("queries", "synthesize", "train", "serve"):
        assert rows[stage]["hours"] is None and rows[stage]["missing"] and rows[stage]["how_to_measure"]
    assert "train.tokens_per_s_gpu_8b" in rows["train"]["missing"]
    # 10 cultures x 5 tasks x 40 queries at qps 20 achieving half the limit: 200 s.
    assert est["counts"]["queries"] == 2000
    assert rows["search"]["hours"] == pytest.approx(200 / 3600, abs=1e-3)
    assert rows["search"]["usd"] == pytest.approx(200 / 3600 * 1.0 + 2 * 5.0, abs=0.01)
    assert est["reference_not_applicable"]["train.tokens_per_s_cpu"]["value"] == 400.0


def test_estimate_uses_gpu_figures_when_measured():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    est = _bench("estimate").estimate(cfg, _results(
        search={"qps_ratio": 1.0, "p50_ms": 50.0},
        synthesis={"tokens_per_s_gpu_8b": 1000.0, "kept_fraction": 0.5},
        train={"tokens_per_s_gpu_8b": 2000.0, "workers": 1},
        serve={"rps_multi8_gpu_8b": 4.0}), PRICES)
    rows = {r["stage"]: r for r in est["rows"]}
    # 25,000 generations x 1024 tokens over 4 vLLM replicas at 1000 tok/s each.
    assert rows["synthesize"]["hours"] == pytest.approx(25_000 * 1024 / 4000 / 3600, abs=1e-3)
    # 12,500 samples x 1024 tokens x 2 epochs, 10 trials of 2 GPUs, 4 at once -> 3 waves.
    per_trial_h = 1250 * 1024 * 2 / (2000 * 2) / 3600
    assert rows["train"]["hours"] == pytest.approx(3 * per_trial_h, abs=1e-3)
    assert rows["serve"]["usd"] == pytest.approx(3 * 2.0)  # ceil(10 / 4) replicas, 1 GPU-hour each
    assert est["stages_unavailable"] == ["route"]
