"""The queries stage: prompts per (culture, task, kind), lenient parsing with counted rejections,
near-duplicate removal, template top-up, and the stage end to end on a real local Ray.

python -m pytest tests/cpu/test_queries.py -q
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.conftest import LoopbackChatServer

from cm_ray import checks
from cm_ray.config import ConfigError, load_config
from cm_ray.data.queries import (assemble, build_query_messages, parse_queries, query_id, run_queries,
                                 template_queries)
from cm_ray.stages import run_stage
from cm_ray.storage import ArtifactStore
from cm_ray.tasks import load_task

QCFG = load_config().queries
CONTRACT = ["query_id", "culture", "task", "kind", "query", "locale"]


def test_specific_prompt_names_the_task_and_agnostic_prompt_the_general_culture():
    spec = load_task("offensive")
    specific = build_query_messages("KR", spec, "specific", 3)[-1]["content"]
    agnostic = build_query_messages("KR", spec, "agnostic", 3)[-1]["content"]
    assert "3 different web search queries" in specific and "South Korea" in specific
    assert "offensive" in specific and "slurs" in specific
    assert "offensive" not in agnostic and "social norms" in agnostic
    assert '{"queries": [' in specific


def test_parse_is_lenient_about_shape_but_validates_each_query():
    good, why = parse_queries('Here you go: {"queries": ["insults in Mexican slang", 42, "ab", "query one"]}', QCFG)
    assert good == ["insults in Mexican slang"]
    assert Counter(why) == {"not_a_string": 1, "too_short": 1, "placeholder": 1}
    # Shapes small models produce: one-key dicts, a bare list, a numbered list without JSON.
    assert parse_queries('{"queries": [{"query one": "Mexican etiquette at dinner"}]}', QCFG)[0] == [
        "Mexican etiquette at dinner"]
    assert parse_queries('["family values Mexico"]', QCFG)[0] == ["family values Mexico"]
    assert parse_queries('1. "taboo topics in Mexico"\n2. respect for elders Mexico', QCFG)[0] == [
        "taboo topics in Mexico", "respect for elders Mexico"]
    assert parse_queries("I cannot help with that.", QCFG) == ([], ["no_json"])
    assert parse_queries('{"queries": ["' + "x " * 150 + '"]}', QCFG)[1] == ["too_long"]


def test_assemble_keeps_llm_queries_first_dedups_and_tops_up_with_templates():
    cfg = load_config(None, ["queries.n_specific=3", "queries.n_agnostic=2"])
    reasons: Counter = Counter()
    gen = {"specific": json.dumps({"queries": ["offensive slang in Mexico", "Offensive slang in Mexico!",
                                                "offensive slang used in Mexico", "insults on Mexican social media"]}),
           "agnostic": "no json at all"}
    rows = assemble(cfg, "MX", "offensive", gen, reasons)
    spec_rows = [r for r in rows if r["kind"] == "specific"]
    assert [r["source"] for r in spec_rows] == ["llm", "llm", "template"]
    assert spec_rows[0]["query"] == "offensive slang in Mexico"
    assert [r["source"] for r in rows if r["kind"] == "agnostic"] == ["template", "template"]
    assert reasons == {"duplicate": 1, "near_duplicate": 1, "no_json": 1}
    assert all(r["locale"] == "es-MX" and r["culture"] == "MX" for r in rows)
    assert len({r["query_id"] for r in rows}) == len(rows)
    assert rows[0]["query_id"] == query_id("MX", "offensive", "specific", "offensive slang in Mexico!")


def test_template_queries_are_deterministic_and_kind_specific():
    spec = load_task("survey")
    assert template_queries("CN", spec, "specific") == template_queries("CN", spec, "specific")
    assert all("China" in q for q in template_queries("CN", spec, "agnostic"))
    assert set(template_queries("CN", spec, "specific")).isdisjoint(template_queries("CN", spec, "agnostic"))


def test_config_rejects_unknown_kinds():
    with pytest.raises(ConfigError, match=r"^queries.kinds"):
        load_config(None, ["queries.kinds=[specific, local]"])


class QueryLLM(LoopbackChatServer):
    """OpenAI-compatible server on 127.0.0.1 answering query prompts with a duplicate and a placeholder."""

    def __init__(self):
        self.requests: list[dict] = []
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        self.requests.append(body)
        user = body["messages"][-1]["content"]
        name = re.search(r"Each query names (.+?) and is", user).group(1)
        kind = "offensive words" if "bears on this task" in user else "family life"
        text = json.dumps({"queries": [f"{kind} in {name} today", f"{kind} in {name} today!", "query one"]})
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 5}})


@pytest.fixture(scope="module")
def query_llm():
    server = QueryLLM()
    yield server
    server.close()


def test_stage_writes_one_partition_per_culture_with_counts_and_resumes(ray_local, query_llm, tmp_path):
    cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[GB, CN, MX]", "tasks=[offensive, survey]",
                             "queries.n_specific=2", "queries.n_agnostic=2", "synthesis.engine=openai",
                             f"synthesis.openai.base_url={query_llm.url}", "synthesis.openai.model=fake"])
    store = ArtifactStore(cfg.root)
    summary = run_queries(cfg, store)
    assert len(query_llm.requests) == 3 * (2 + 1)  # specific per (culture, task), agnostic per culture
    assert all(r["response_format"]["json_schema"]["schema"]["properties"]["queries"]["maxItems"] == 2
               for r in query_llm.requests)  # the schema travels to the engine for guided decoding
    assert store.files("queries", suffix=".parquet") == [f"culture={c}/part-0.parquet" for c in ["CN", "GB", "MX"]]
    rows = store.read_rows("queries")
    assert set(CONTRACT) <= set(rows[0])
    assert len(rows) == summary["queries"] == 3 * 2 * 4
    assert summary["by_source"] == {"llm": 12, "template": 12}  # one good LLM query per prompt
    assert summary["rejected"] == {"duplicate": 12, "placeholder": 12}
    assert len({r["query_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["locale"] == {"GB": "en-GB", "CN": "zh-CN", "MX": "es-MX"}[r["culture"]]
    llm_first = [r["source"] for r in rows if r["culture"] == "MX" and r["task"] == "survey"]
    assert llm_first == ["llm", "llm", "template", "template"]
    again = run_queries(cfg, store)
    assert again["cultures_skipped"] == 3 and len(query_llm.requests) == 9


def test_tiny_model_output_still_yields_template_queries_for_every_pair(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[KR]", "tasks=[offensive, cultural_qa]",
                             f"models.generator={tiny_model_dir}", "synthesis.guided_json=false"])
    store = ArtifactStore(cfg.root)
    summary = run_queries(cfg, store)
    rows = store.read_rows("queries")
    for task in ("offensive", "cultural_qa"):
        for kind in ("specific", "agnostic"):
            assert sum(r["task"] == task and r["kind"] == kind for r in rows) == 3
    assert summary["generations"] == 3 and summary["queries"] == 12  # agnostic: one generation for both tasks
    assert summary["by_source"].get("template", 0) + summary["by_source"].get("llm", 0) == 12
    # A random-weight model's candidates are rejected: the summary says so per culture.
    (d,) = summary["degradations"]
    assert d["kind"] == "llm_queries_rejected" and d["key"] == "KR" and d["total"] >= 3
    assert summary["per_culture"]["KR"]["llm_candidates"] == d["total"]


def test_llm_off_writes_template_queries_without_an_engine(query_llm, tmp_path):
    cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[GB]", "tasks=[offensive]", "queries.llm=false",
                             "synthesis.engine=openai", f"synthesis.openai.base_url={query_llm.url}"])
    before = len(query_llm.requests)
    summary = run_queries(cfg, ArtifactStore(cfg.root))
    assert len(query_llm.requests) == before and summary["generations"] == 0
    assert summary["by_source"] == {"template": 6} and summary["rejected"] == {}
    assert "queries.llm=false" in summary["headline"]
    with pytest.raises(ConfigError, match=r"^queries.llm"):
        load_config(None, ["queries.llm=false", "queries.template_fill=false"])


def test_the_token_budget_fits_the_requested_count_and_a_budget_that_cannot_is_a_config_error():
    cfg = load_config(None, ["queries.n_specific=20", "queries.n_agnostic=5"])
    q = cfg.queries
    assert q.max_new_tokens is None and q.largest_count() == 20
    # 20 queries of up to max_chars characters at ~4 characters a token, with the JSON around them.
    assert q.generation_tokens() == q.tokens_needed() >= 20 * q.max_chars // 4
    with pytest.raises(ConfigError, match=r"^queries.max_new_tokens: 160 tokens cannot hold 20 queries"):
        load_config(None, ["queries.n_specific=20", "queries.n_agnostic=20", "queries.max_new_tokens=160"])
    assert load_config(None, ["queries.n_specific=20", "queries.max_new_tokens=1200"]).queries.generation_tokens() == 1200
    # Without the LLM nothing is generated, so nothing is checked.
    assert load_config(None, ["queries.n_specific=20", "queries.llm=false", "queries.max_new_tokens=16"])


class CuttingLLM(LoopbackChatServer):
    """OpenAI-compatible server writing as many distinct queries as asked for, cut off at
    ``max_tokens`` tokens of 4 characters (finish_reason length), as a real engine is; or prose."""

    def __init__(self, prose: bool = False):
        self.max_tokens: list[int] = []
        self.prose = prose
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        self.max_tokens.append(body["max_tokens"])
        user = body["messages"][-1]["content"]
        n = int(re.search(r"Write (\d+) different", user).group(1))
        name = re.search(r"Each query names (.+?) and is", user).group(1)
        kind = "offensive words" if "bears on this task" in user else "family life"
        text = "I would search the web." if self.prose else json.dumps(
            {"queries": [f"{kind} in {name} topic{i} aspect{i} view{i} angle{i}" for i in range(n)]})
        cut = text[:4 * body["max_tokens"]]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop" if cut == text else "length",
                                               "message": {"role": "assistant", "content": cut}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": len(cut) // 4}})


def test_twenty_queries_a_pair_come_from_the_llm_not_from_templates(ray_local, tmp_path):
    server = CuttingLLM()
    try:
        cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[KR]", "tasks=[offensive]",
                                 "queries.n_specific=20", "queries.n_agnostic=20", "synthesis.engine=openai",
                                 f"synthesis.openai.base_url={server.url}", "synthesis.openai.model=fake"])
        summary = run_queries(cfg, ArtifactStore(cfg.root))
    finally:
        server.close()
    assert server.max_tokens == [cfg.queries.generation_tokens()] * 2
    assert summary["by_source"] == {"llm": 40} and summary["rejected"] == {}
    kr = summary["per_culture"]["KR"]
    assert kr["by_source"] == {"llm": 40} and kr["llm_candidates"] == 40 and kr["rejected"] == {}
    (d,) = summary["degradations"]
    assert (d["kind"], d["key"], d["bad"], d["total"]) == ("llm_queries_rejected", "KR", 0, 40)


def test_a_culture_whose_llm_queries_were_all_rejected_fails_the_stage(ray_local, tmp_path):
    server = CuttingLLM(prose=True)
    try:
        cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[GB, MX]", "tasks=[offensive, survey]",
                                 "synthesis.engine=openai", f"synthesis.openai.base_url={server.url}",
                                 "synthesis.openai.model=fake"])
        store = ArtifactStore(cfg.root)
        with pytest.raises(checks.DegradedError, match=r"^queries: degraded past its thresholds for GB, MX") as e:
            run_stage("queries", cfg, store)
    finally:
        server.close()
    assert {d["key"] for d in e.value.over} == {"GB", "MX"}
    manifest = store.read_manifest("queries")
    for c in ("GB", "MX"):
        entry = manifest["per_culture"][c]
        # Per (task, kind): the agnostic generation serves both tasks and is rejected for each.
        assert entry["rejected"] == {"no_json": 4} and entry["by_source"] == {"template": 12}
    assert all(d["bad"] == d["total"] == 4 and d["fraction"] == 1.0 for d in manifest["degradations"])
    assert store.read_rows("queries")  # the template queries are written all the same
