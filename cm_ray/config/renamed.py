"""Keys that were renamed or removed, and what replaces them (drives the load errors)."""

from __future__ import annotations

_OPENAI = ("base_url", "model", "api_key_env", "qps", "max_in_flight", "max_retries", "backoff_base_s",
           "backoff_max_s", "timeout_s", "price_in_per_1m", "price_out_per_1m")
_VLLM = ("max_model_len", "max_num_seqs", "enforce_eager", "engine_kwargs")
_CULTURESPA = ("questions_per_topic", "topics", "rounds", "real_examples", "generated_examples",
               "question_max_new_tokens")
_CLCA = ("scenarios_per_culture", "max_turns", "turn_max_new_tokens", "judge_max_new_tokens", "turn_format")

RENAMED: dict[str, str] = {
    **{f"synthesis.openai_{k}": f"synthesis.openai.{k}" for k in _OPENAI},
    **{f"synthesis.vllm_{k}": f"synthesis.vllm.{k}" for k in _VLLM},
    "search.fetch_pages": "search.fetch.enabled",
    "search.fetch_top_k": "search.fetch.top_k",
    "search.fetch_max_bytes": "search.fetch.max_bytes",
    "search.fetch_timeout_s": "search.fetch.timeout_s",
    "search.allow_private_urls": "search.fetch.allow_private_urls",
    **{f"recipe_options.{k}": f"culturespa.{k}" for k in _CULTURESPA},
    **{f"recipe_options.{k}": f"clca.{k}" for k in _CLCA},
    "recipe_options": "the culturespa: and clca: sections (recipe_options.<key> -> culturespa.<key> or clca.<key>)",
    "train.joint_system_prompt": "removed: the joint adapter is trained and evaluated with the one culture "
                                 "prompt, cm_ray.artifacts.culture_system_prompt(culture)",
}
"""Old dotted key -> its new dotted key, or a note starting with "removed:"."""


def renamed_message(old: str) -> str:
    new = RENAMED[old]
    return new if new.startswith("removed:") else f"renamed: use {new}"
