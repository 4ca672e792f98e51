"""Task specs: every shipped YAML loads, its seed examples satisfy its own JSON schema, rendering agrees.

python -m pytest tests/cpu/test_tasks_specs.py -q
"""

from __future__ import annotations

import jsonschema
import pytest

from cm_ray.config import ConfigError
from cm_ray.tasks import available_tasks, load_task

SHIPPED = ["advice", "cultural_qa", "multiple_choice", "offensive", "survey"]


def test_shipped_specs_are_the_five_named_tasks():
    assert available_tasks() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_seed_examples_satisfy_the_json_schema_guided_decoding_uses(name):
    spec = load_task(name)
    assert len(spec.examples) >= 2
    for ex in spec.examples:
        jsonschema.validate({**ex, "sources": [1]}, spec.json_schema())
        assert spec.validate(ex) is None


@pytest.mark.parametrize("name", SHIPPED)
def test_specs_name_search_topics_and_synthesis_guidance(name):
    spec = load_task(name)
    assert spec.search_topics and all(isinstance(t, str) and t for t in spec.search_topics)
    assert spec.synthesis_guidance.strip()


def test_label_of_is_the_answer_for_label_tasks_and_none_for_free_text():
    off, survey, qa = load_task("offensive"), load_task("survey"), load_task("cultural_qa")
    assert off.label_of(off.examples[1]) == "offensive"
    assert survey.label_of(survey.examples[0]) == "1"
    assert qa.label_of(qa.examples[0]) is None


def test_input_text_joins_inputs_and_leaves_out_the_answer():
    survey = load_task("survey")
    text = survey.input_text(survey.examples[1])
    assert "most people can be trusted" in text and "Need to be very careful" in text
    assert survey.examples[1]["answer"] not in text.split()


def test_validate_rejects_labels_outside_the_set_and_out_of_range_options():
    off, survey = load_task("offensive"), load_task("survey")
    assert "not in" in off.validate({"text": "hi there", "label": "rude"})
    assert "option number" in survey.validate({"question": "q?", "options": ["a", "b"], "answer": "3"})


def test_validate_checks_structure_with_the_json_schema_and_names_the_field():
    survey, qa = load_task("survey"), load_task("cultural_qa")
    ok = {"question": "q?", "options": ["a", "b"], "answer": 2, "sources": [1]}
    assert survey.validate(ok) is None  # an integer answer and extra keys are accepted
    assert survey.validate({**ok, "question": "   "}) == "missing or empty field 'question'"
    assert survey.validate({**ok, "options": ["a", " "]}).startswith("field 'options' must be a list")
    assert survey.validate({k: v for k, v in ok.items() if k != "answer"}) == "missing or empty field 'answer'"
    long = {f.name: "x" for f in qa.inputs} | {qa.answer_field: "y" * (qa.max_answer_chars + 1)}
    assert qa.validate(long) == f"answer longer than {qa.max_answer_chars} characters"
    assert qa.validate([1, 2]) == "not a JSON object"


def test_a_spec_with_an_invalid_seed_example_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndescription: d\nkind: classification\ninstruction: i\n"
                   "inputs: [{name: text}]\nanswer_field: label\nlabels: [a, b]\n"
                   "examples: [{text: x, label: c}]\n")
    with pytest.raises(ConfigError, match=r"task bad.examples\[0\]"):
        load_task(str(bad))
