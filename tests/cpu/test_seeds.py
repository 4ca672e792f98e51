"""Every generation gets its own seed, reproducible from the run seed: identical prompts (several
samples of one prompt) must not come back identical from seeded engines (vLLM, OpenAI-compatible).

python -m pytest tests/cpu/test_seeds.py -q
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from cm_ray.config import load_config
from cm_ray.generation.generate import AsyncGeneratorUDF, row_seed
from tests.conftest import LoopbackChatServer


class SeedEcho(LoopbackChatServer):
    """Answers with the seed each request carried."""

    def __init__(self):
        self.seeds: list = []
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        self.seeds.append(body.get("seed"))
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": json.dumps(body.get("seed"))}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}})


def _run(udf, batch):
    async def go():
        return [out async for out in udf(batch)]
    return asyncio.run(go())[0]


def test_identical_prompts_get_distinct_seeds_that_a_rerun_repeats():
    msgs = [{"role": "user", "content": "Write one sample."}]
    assert row_seed(0, msgs, 0) != row_seed(0, msgs, 1) != row_seed(0, msgs, 2)
    assert row_seed(0, msgs, 1) == row_seed(0, msgs, 1) and row_seed(1, msgs, 1) != row_seed(0, msgs, 1)
    assert row_seed(None, msgs, 1) is None and 0 <= row_seed(7, msgs, 3) < 2 ** 31

    server = SeedEcho()
    try:
        cfg = load_config(None, ["synthesis.engine=openai", f"synthesis.openai.base_url={server.url}",
                                 "synthesis.openai.model=m", "seed=5"])
        params = dict(max_new_tokens=8, temperature=0.7, top_p=0.95, seed=cfg.seed)
        batch = {"messages": np.array([msgs] * 4, dtype=object), "sample_idx": np.array([0, 1, 2, 0]),
                 "json_schema": np.array(["", "", "", ""], dtype=object)}
        udf = AsyncGeneratorUDF(cfg.synthesis, "m", params)
        first = [json.loads(t) for t in _run(udf, batch)["generated_text"]]
        again = [json.loads(t) for t in _run(AsyncGeneratorUDF(cfg.synthesis, "m", params), batch)["generated_text"]]
    finally:
        server.close()
    assert first == [row_seed(5, msgs, i) for i in (0, 1, 2, 0)]  # each row's own seed reached the API
    assert len(set(first[:3])) == 3 and first[3] == first[0]  # distinct samples; the same sample again
    assert again == first and len(server.seeds) == 8
