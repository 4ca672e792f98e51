"""Task specs: what a culture-sensitive task looks like, so samples are made in its own format.

A spec (``cm_ray/tasks/<name>.yaml`` or any YAML path) names the task's input fields, its answer
(a label set, an option code or free text), the JSON schema one synthesized sample must satisfy,
and 2-3 seed examples. The same spec renders the user prompt and the expected answer for training,
serving and evaluation, so the three always agree on the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cm_ray import safe_yaml
from cm_ray.config import ConfigError, build

TASK_DIR = Path(__file__).parent
KINDS = ("classification", "survey", "short_answer", "multiple_choice", "open_ended")


@dataclass
class InputField:
    name: str
    description: str = ""
    type: str = "string"
    """string, or list (e.g. answer options)."""


@dataclass
class TaskSpec:
    name: str
    description: str
    kind: str
    """classification, survey, short_answer, multiple_choice or open_ended."""
    instruction: str
    """What the user asks the model to do with the inputs (goes first in the user prompt)."""
    inputs: list[InputField]
    answer_field: str = "answer"
    labels: list[str] | None = None
    """Allowed answers for classification tasks."""
    answer_format: str = ""
    """How the answer looks, for prompts (e.g. 'the option number only')."""
    examples: list[dict] = field(default_factory=list)
    """Seed samples: dicts with every input field and the answer field."""
    max_answer_chars: int = 600
    search_topics: list[str] = field(default_factory=list)
    """What about a culture bears on this task (for task-specific search queries)."""
    synthesis_guidance: str = ""
    """Extra instruction for the synthesizer (what good samples of this task look like)."""

    def __post_init__(self):
        where = f"task {self.name}"
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "classification" and not self.labels:
            raise ConfigError(f"{where}.labels: a classification task needs a label set")
        if not self.inputs:
            raise ConfigError(f"{where}.inputs: list at least one input field")
        for i, ex in enumerate(self.examples):
            reason = self.validate(ex)
            if reason:
                raise ConfigError(f"{where}.examples[{i}]: {reason}")

    # -- schema ----------------------------------------------------------------------------
    @property
    def fields(self) -> list[str]:
        return [f.name for f in self.inputs] + [self.answer_field]

    def json_schema(self) -> dict:
        """JSON schema of one sample (what guided decoding constrains to)."""
        props: dict[str, Any] = {}
        for f in self.inputs:
            props[f.name] = ({"type": "array", "items": {"type": "string"}, "minItems": 2}
                             if f.type == "list" else {"type": "string", "minLength": 1})
        answer: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.labels:
            answer = {"type": "string", "enum": list(self.labels)}
        props[self.answer_field] = answer
        props["sources"] = {"type": "array", "items": {"type": "integer"}}
        return {"type": "object", "properties": props, "required": self.fields,
                "additionalProperties": False}

    def validation_schema(self) -> dict:
        """JSON schema that a parsed sample must satisfy: the guided schema's structure, leniently
        (extra keys allowed, an integer answer accepted, whitespace-only strings refused)."""
        text = {"type": "string", "pattern": r"\S"}
        props: dict[str, Any] = {f.name: ({"type": "array", "minItems": 2, "items": text} if f.type == "list" else text)
                                 for f in self.inputs}
        props[self.answer_field] = {"anyOf": [{**text, "maxLength": self.max_answer_chars},
                                              {"type": "integer"}]}
        return {"type": "object", "properties": props, "required": self.fields}

    def validate(self, sample: Any) -> str | None:
        """None when ``sample`` is a valid sample of this task, else the reason it is not.

        Structure is checked with jsonschema (``validation_schema``); what a schema cannot say —
        the stripped label in the label set, an option number within the sample's own options —
        is checked here."""
        if not isinstance(sample, dict):
            return "not a JSON object"
        bad = {}
        for err in _validator(self).iter_errors(sample):
            name = err.path[0] if err.path else (err.message.split("'")[1] if err.validator == "required" else None)
            bad.setdefault(name, err)
        for name in [n for n in self.fields if n in bad]:
            field_ = next((f for f in self.inputs if f.name == name), None)
            if field_ is not None and field_.type == "list":
                return f"field {name!r} must be a list of at least 2 non-empty strings"
            value = sample.get(name)
            if name == self.answer_field and isinstance(value, str) and value.strip():
                return f"answer longer than {self.max_answer_chars} characters"
            return f"missing or empty field {name!r}"
        ans = sample[self.answer_field]
        ans = str(int(ans)) if isinstance(ans, (int, float)) else ans.strip()
        if self.labels and ans not in self.labels:
            return f"label {ans!r} not in {self.labels}"
        if self.kind in ("survey", "multiple_choice"):
            options = self._options(sample)
            if not ans.isdigit() or not 1 <= int(ans) <= len(options):
                return f"answer {ans!r} is not an option number 1..{len(options)}"
        return None

    def normalize(self, sample: dict) -> dict:
        """Keep the schema's fields, answer as a stripped string."""
        out = {f.name: sample[f.name] for f in self.inputs}
        ans = sample[self.answer_field]
        out[self.answer_field] = str(int(ans)) if isinstance(ans, (int, float)) else ans.strip()
        return out

    def label_of(self, sample: dict) -> str | None:
        """The sample's answer as a label (classification, survey, multiple choice), else None."""
        if self.kind in ("short_answer", "open_ended"):
            return None
        return self.render_output(sample)

    def input_text(self, sample: dict) -> str:
        """The sample's inputs as plain text (for deduplication and relevance scoring)."""
        parts = []
        for f in self.inputs:
            v = sample[f.name]
            parts.append(" | ".join(v) if isinstance(v, list) else str(v))
        return "\n".join(parts)

    def _options(self, sample: dict) -> list[str]:
        for f in self.inputs:
            if f.type == "list":
                return list(sample.get(f.name) or [])
        return []

    # -- rendering -------------------------------------------------------------------------
    def render_input(self, sample: dict) -> str:
        """The user message for one sample (same at training, serving and evaluation time)."""
        parts = [self.instruction.strip()]
        for f in self.inputs:
            v = sample[f.name]
            if f.type == "list":
                v = "\n".join(f"{i}. {opt}" for i, opt in enumerate(v, 1))
            label = f.name.replace("_", " ").capitalize()
            parts.append(f"{label}:\n{v}" if f.type == "list" else f"{label}: {v}")
        if self.labels:
            parts.append(f"Answer with one of: {', '.join(self.labels)}.")
        elif self.answer_format:
            parts.append(f"Answer with {self.answer_format}.")
        return "\n".join(parts)

    def render_output(self, sample: dict) -> str:
        ans = sample[self.answer_field]
        return str(int(ans)) if isinstance(ans, (int, float)) else str(ans).strip()

    def messages(self, sample: dict, system: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": self.render_input(sample)},
                       {"role": "assistant", "content": self.render_output(sample)}]

    def example_json(self, k: int | None = None) -> str:
        return "\n".join(json.dumps(ex, ensure_ascii=False) for ex in self.examples[:k])


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_task(name_or_path: str) -> TaskSpec:
    """Load a task spec by name (shipped specs) or from a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"task {name_or_path!r}: no such spec (shipped: {', '.join(available_tasks())})")
    try:
        data = safe_yaml.load(path)  # with size and alias limits
    except safe_yaml.YAMLInputError as e:
        raise ConfigError(f"task {name_or_path!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task {name_or_path!r}: the YAML must be a mapping")
    return build(TaskSpec, data, f"task {data.get('name', name_or_path)}")


@lru_cache(maxsize=64)
def _validator_for(schema_json: str):
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(schema_json))


def _validator(spec: "TaskSpec"):
    return _validator_for(json.dumps(spec.validation_schema(), sort_keys=True))
