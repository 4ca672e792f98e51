"""Run an LLM over a Ray Dataset of chat conversations, with whichever engine the config names.

Input columns:  messages (list of {role, content}), json_schema (str, optional: JSON schema text)
Output columns: generated_text (str), prompt_tokens (int), output_tokens (int), engine, model
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cm_ray.config import Config

if TYPE_CHECKING:
    import ray.data


class GeneratorUDF:
    """Ray Data UDF holding one engine replica (built once per actor)."""

    def __init__(self, cfg_dict: dict, engine: str | None, params: dict):
        from cm_ray.config import config_from_dict
        from cm_ray.data.engines import GenerationParams, make_engine

        self.cfg = config_from_dict(cfg_dict)
        self.engine = make_engine(self.cfg, engine)
        self.params = params
        self.GenerationParams = GenerationParams

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        convs = [[dict(m) for m in msgs] for msgs in batch["messages"]]
        schemas = batch.get("json_schema")
        out_text, p_tok, o_tok = [], [], []
        # Rows with the same schema are generated together (one guided grammar per call).
        groups: dict[str | None, list[int]] = {}
        for i in range(len(convs)):
            key = None if schemas is None else schemas[i]
            groups.setdefault(key or None, []).append(i)
        results: dict[int, Any] = {}
        for schema, idx in groups.items():
            params = self.GenerationParams(**self.params,
                                           json_schema=json.loads(schema) if schema else None)
            for i, g in zip(idx, self.engine.generate([convs[i] for i in idx], params)):
                results[i] = g
        for i in range(len(convs)):
            out_text.append(results[i].text)
            p_tok.append(results[i].prompt_tokens)
            o_tok.append(results[i].output_tokens)
        return {**batch, "generated_text": out_text, "prompt_tokens": p_tok, "output_tokens": o_tok,
                "engine": [self.engine.name] * len(convs), "model": [self.engine.model] * len(convs)}


def generate(ds: "ray.data.Dataset", cfg: Config, *, max_new_tokens: int, temperature: float,
             top_p: float = 0.95, seed: int | None = None, engine: str | None = None) -> "ray.data.Dataset":
    """Append generations to every row of ``ds`` (lazy; nothing runs until consumed)."""
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=cfg.seed if seed is None else seed)
    return ds.map_batches(
        GeneratorUDF,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "engine": engine, "params": params},
        batch_size=cfg.synthesis.batch_size,
        concurrency=cfg.synthesis.concurrency,
        batch_format="numpy",
    )
