"""Sections of the sibling recipes, ``culturespa:`` and ``clca:`` (read only by their recipe; a
setting under the other recipes' section is an error)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cm_ray.config.base import Section


class CultureSPAConfig(Section):
    """CultureSPA: self-generated survey questions, culture-unaware vs culture-aware answers."""

    questions_per_topic: int = Field(2, ge=0)
    """New survey questions per WVS topic (the paper: 1,000)."""
    topics: list[int | str] | None = None
    """WVS topics to cover, by index (0-12) or name; None = all 13."""
    rounds: int = Field(2, ge=0)
    """Question-generation rounds; later rounds add earlier generated questions as examples
    (0 counts as 1)."""
    real_examples: int = Field(3, ge=0)
    """Few-shot examples per prompt from real (or seed) WVS questions."""
    generated_examples: int = Field(2, ge=0)
    """Few-shot examples per prompt from questions generated in earlier rounds."""
    question_max_new_tokens: int = Field(160, ge=0)
    """Token budget of one generated question."""


class CLCAConfig(Section):
    """CLCA: role-played multi-turn dialogues, judged, with intents."""

    scenarios_per_culture: int = Field(1, ge=0)
    """Culture-adapted scenarios per culture."""
    max_turns: int = Field(6, ge=0)
    """Dialogue turns at most (the paper: up to 10)."""
    turn_max_new_tokens: int = Field(64, ge=0)
    """Token budget of one turn."""
    judge_max_new_tokens: int = Field(96, ge=0)
    """Token budget of one judge / meta-critique answer."""
    turn_format: Literal["json", "text"] = "json"
    """json asks for the seed's {"action", "output"} per turn; text asks for the next line only
    and reads the action off it (small models write a spoken line more often in text form)."""
