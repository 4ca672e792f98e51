"""The synthesis stage end to end on a real local Ray: fixture search results -> synth/ partitions.

The LLM is a real HTTP server on 127.0.0.1 speaking OpenAI's chat-completions JSON (the network edge);
it writes samples from the prompt's own snippets, and deliberately answers some prompts with prose
so rejections are exercised. Other tests use the tiny random model and the real SmolLM2.

python -m pytest tests/cpu/test_synth_pipeline.py -q
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import LoopbackChatServer, assert_synth_contract

from cm_ray.artifacts import SYNTH_COLUMNS, read_synth
from cm_ray.config import load_config
from cm_ray.data.synthesize import run_synthesis
from cm_ray.storage import ArtifactStore

CULTURES, TASKS = ["GB", "MX"], ["offensive", "survey"]


class FakeLLM(LoopbackChatServer):
    """OpenAI-compatible server. Synthesis prompts get a sample built from the focused snippet
    (label = the asked-for label, sources = [focus]); prompts focused on [S3] get prose (no JSON)."""

    def __init__(self):
        self.requests: list[str] = []
        super().__init__()

    @staticmethod
    def answer(user: str) -> str:
        focus = int(re.search(r"source \[S(\d+)\]", user).group(1))
        if focus == 3:
            return "Sure! Here is a great sample about the culture."
        body = re.search(rf"\[S{focus}\] [^:]*: (.*)", user).group(1)
        label = re.search(r'whose "label" is "([^"]+)"', user)
        if '"options"' in user:
            sample = {"question": f"{body} Do you agree?", "options": ["Agree", "Disagree"], "answer": "1"}
        else:
            sample = {"text": f"{body} ({label.group(1)})", "label": label.group(1)}
        return json.dumps({**sample, "sources": [focus]})

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        user = body["messages"][-1]["content"]
        self.requests.append(user)
        text = self.answer(user)
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 10}})


@pytest.fixture(scope="module")
def fake_llm():
    server = FakeLLM()
    yield server
    server.close()


def write_search_fixture(store: ArtifactStore, cultures=CULTURES, tasks=TASKS, n_queries=2, n_hits=3):
    """search/results/culture=XX/part-0.parquet in the search stage's contract (one failed query too)."""
    for c in cultures:
        rows = []
        for t in tasks:
            for q in range(n_queries):
                kind = "specific" if q % 2 == 0 else "agnostic"
                hits = [{"title": f"{c} {t} source {q}-{h}", "url": f"https://{c.lower()}.example/{t}/{q}/{h}",
                         "snippet": f"In {c}, people discuss {t} topic {q} {h} with words w{q}{h} z{h}{q} v{q * 7 + h}.",
                         "rank": h + 1, "provider": "bm25", "locale": "en", "fetched_at": "2026-11-30T00:00:00Z"}
                        for h in range(n_hits)]
                rows.append({"query_id": f"{c}-{t}-{q}", "culture": c, "task": t, "kind": kind,
                             "query": f"{t} in {c} {q}", "locale": "en", "status": "ok", "error": None,
                             "provider": "bm25", "cached": False, "hits": hits})
            rows.append({"query_id": f"{c}-{t}-failed", "culture": c, "task": t, "kind": "agnostic",
                         "query": "x", "locale": "en", "status": "failed", "error": "HTTP 500",
                         "provider": "bm25", "cached": False, "hits": []})
        store.write_table(rows, "search", "results", f"culture={c}", "part-0.parquet")


def fake_cfg(root, url, *extra):
    return load_config(None, [f"root={root}", f"cultures={CULTURES}", f"tasks={TASKS}",
                              "synthesis.engine=openai", f"synthesis.openai.base_url={url}",
                              "synthesis.openai.model=fake", "synthesis.prompts_per_pair=2",
                              "synthesis.samples_per_prompt=3", "synthesis.snippets_per_prompt=3",
                              "synthesis.relevance_filter=none", *extra])


def partition_bytes(store):
    return {p: store.read_bytes("synth", p) for p in store.files("synth", suffix=".parquet")}


def test_partitions_hold_grounded_samples_with_provenance_and_counted_drops(ray_local, fake_llm, tmp_path):
    cfg = fake_cfg(tmp_path / "run", fake_llm.url)
    store = ArtifactStore(cfg.root)
    write_search_fixture(store)
    n_before = len(fake_llm.requests)
    summary = run_synthesis(cfg, store)
    generations = len(CULTURES) * len(TASKS) * 2 * 3
    assert len(fake_llm.requests) - n_before == generations
    assert sorted(store.files("synth", suffix=".parquet")) == [
        f"culture={c}/task={t}/part-0.parquet" for c in CULTURES for t in TASKS]
    rows = read_synth(store).to_pylist()
    assert rows and set(SYNTH_COLUMNS) <= set(rows[0])
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["snippet_urls"] and all(u.startswith(f"https://{r['culture'].lower()}.example/{r['task']}/")
                                         for u in r["snippet_urls"])
        assert all(q.startswith(f"{r['culture']}-{r['task']}-") and "failed" not in q for q in r["query_ids"])
        assert r["engine"] == "openai" and r["model"] == "fake" and len(r["prompt_hash"]) == 16
        assert r["split"] in ("train", "validation")
        assert r["messages"][-1] == {"role": "assistant", "content": r["output"]}
    assert {r["label"] for r in rows if r["task"] == "offensive"} == {"offensive", "not_offensive"}
    # Every candidate is accounted for: per culture, in == out + dropped at every filter.
    assert summary["rows"] == len(rows)
    for c, entry in summary["per_culture"].items():
        assert entry["rows_out"] == sum(r["culture"] == c for r in rows)
        for step in entry["filters"].values():
            assert step["in"] == step["out"] + sum(step["dropped"].values())
        # One prompt in three is focused on [S3], which the server answers with prose.
        assert entry["filters"]["parse_validate"]["dropped"] == {"no_json": 4}
    assert store.read_json("synth", "summary.json")["rows"] == len(rows)
    assert assert_synth_contract(store) == len(rows)  # the synthesis stage writes exactly the contract


def test_rerun_skips_finished_partitions_and_regenerates_only_a_deleted_one(ray_local, fake_llm, tmp_path):
    cfg = fake_cfg(tmp_path / "run", fake_llm.url)
    store = ArtifactStore(cfg.root)
    write_search_fixture(store)
    run_synthesis(cfg, store)
    first = partition_bytes(store)
    n = len(fake_llm.requests)
    again = run_synthesis(cfg, store)
    assert again["n_skipped"] == 4 and again["n_written"] == 0 and len(fake_llm.requests) == n
    assert partition_bytes(store) == first
    store.delete("synth", "culture=MX", "task=survey")
    third = run_synthesis(cfg, store)
    assert third["n_written"] == 1 and third["n_skipped"] == 3
    new = fake_llm.requests[n:]
    assert len(new) == 6 and all("Culture: Mexico" in u and '"options"' in u for u in new)
    after = partition_bytes(store)
    assert {k: v for k, v in after.items() if "MX/task=survey" not in k} == \
           {k: v for k, v in first.items() if "MX/task=survey" not in k}
    rows = read_synth(store).to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == third["rows"] == sum(
        read_synth(store, c, t).num_rows for c in CULTURES for t in TASKS)


def test_a_killed_run_resumes_without_duplicates_or_lost_rows(ray_local, fake_llm, tmp_path):
    """What a kill leaves behind (a finished partition, stats without data, a temp file) is
    resumed: the unfinished partitions are generated, finished ones kept, nothing doubled."""
    cfg = fake_cfg(tmp_path / "run", fake_llm.url)
    store = ArtifactStore(cfg.root)
    write_search_fixture(store)
    reference = run_synthesis(cfg, store)
    ref_rows = {r["id"] for r in read_synth(store).to_pylist()}
    # Simulate the kill: two partitions never finished; one left a stats file and a temp file.
    store.delete("synth", "culture=GB", "task=survey")
    store.delete("synth", "culture=MX", "task=offensive")
    store.write_bytes(b"partial", "synth", "culture=MX", "task=offensive", "part-0.parquet.tmp-1")
    resumed = run_synthesis(cfg, store)
    assert resumed["n_written"] == 2
    rows = read_synth(store).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == reference["rows"]
    assert {r["id"] for r in rows} == ref_rows  # same prompts, same fake answers: same samples


def test_force_regenerates_everything(ray_local, fake_llm, tmp_path):
    cfg = fake_cfg(tmp_path / "run", fake_llm.url)
    store = ArtifactStore(cfg.root)
    write_search_fixture(store)
    run_synthesis(cfg, store)
    n = len(fake_llm.requests)
    summary = run_synthesis(cfg, store, force=True)
    assert summary["n_written"] == 4 and len(fake_llm.requests) - n == 24


def test_a_culture_without_search_results_gets_an_empty_counted_partition(ray_local, fake_llm, tmp_path):
    cfg = fake_cfg(tmp_path / "run", fake_llm.url)
    store = ArtifactStore(cfg.root)
    write_search_fixture(store, cultures=["GB"])
    summary = run_synthesis(cfg, store)
    assert read_synth(store, "MX", "offensive").num_rows == 0
    assert summary["per_culture"]["MX"]["rows_out"] == 0 and summary["per_culture"]["GB"]["rows_out"] > 0
    stats = store.read_json("synth", "_stats", "MX.offensive.json")
    assert stats["note"] == "no search snippets"


def test_s3_root_round_trips(ray_local, fake_llm, s3_root):
    cfg = fake_cfg(s3_root, fake_llm.url, "cultures=[MX]", "tasks=[offensive]")
    store = ArtifactStore(cfg.root)
    write_search_fixture(store, cultures=["MX"], tasks=["offensive"])
    summary = run_synthesis(cfg, store)
    rows = read_synth(store, "MX", "offensive").to_pylist()
    assert len(rows) == summary["rows"] > 0
    assert store.read_json("synth", "summary.json")["rows"] == len(rows)
    assert run_synthesis(cfg, store)["n_skipped"] == 1


def test_embedding_relevance_scores_every_kept_row(ray_local, fake_llm, tmp_path):
    cfg = fake_cfg(tmp_path / "run", fake_llm.url, "cultures=[MX]", "tasks=[offensive]",
                   "synthesis.relevance_filter=embedding", "synthesis.relevance_threshold=0.3")
    store = ArtifactStore(cfg.root)
    write_search_fixture(store, cultures=["MX"], tasks=["offensive"])
    summary = run_synthesis(cfg, store)
    rows = read_synth(store).to_pylist()
    assert rows and all(0.3 <= r["relevance"] <= 1.0001 for r in rows)
    assert summary["per_culture"]["MX"]["filters"]["relevance"]["in"] >= len(rows)


def test_tiny_model_with_guided_json_accounts_for_every_generation(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[MX]", "tasks=[offensive, survey]",
                             f"models.generator={tiny_model_dir}", "synthesis.prompts_per_pair=1",
                             "synthesis.samples_per_prompt=2", "synthesis.max_new_tokens=96",
                             "synthesis.guided_max_string_chars=40", "synthesis.relevance_filter=none"])
    store = ArtifactStore(cfg.root)
    write_search_fixture(store, cultures=["MX"], tasks=["offensive", "survey"])
    summary = run_synthesis(cfg, store)
    f = summary["per_culture"]["MX"]["filters"]["parse_validate"]
    assert f["in"] >= 4 and f["in"] == f["out"] + sum(f["dropped"].values())
    assert summary["rows"] == len(read_synth(store).to_pylist()) == assert_synth_contract(store)
    for r in read_synth(store).to_pylist():
        assert load_task_validate(r)


def load_task_validate(row) -> bool:
    from cm_ray.tasks import load_task

    return load_task(row["task"]).validate(json.loads(row["sample_json"])) is None


@pytest.mark.slow
def test_smollm2_writes_a_grounded_schema_valid_sample_per_pair(ray_local, smollm2_dir, tmp_path):
    cfg = load_config(None, [f"root={tmp_path / 'run'}", "cultures=[MX]", "tasks=[offensive, survey]",
                             "synthesis.prompts_per_pair=1", "synthesis.samples_per_prompt=3",
                             "synthesis.max_new_tokens=160", "synthesis.relevance_filter=none",
                             "synthesis.batch_size=6"])
    store = ArtifactStore(cfg.root)
    write_search_fixture(store, cultures=["MX"], tasks=["offensive", "survey"])
    summary = run_synthesis(cfg, store)
    for t in ["offensive", "survey"]:
        rows = read_synth(store, "MX", t).to_pylist()
        assert rows, summary["per_culture"]["MX"]["filters"]
        assert all(r["snippet_urls"] and load_task_validate(r) for r in rows)
