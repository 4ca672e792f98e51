"""CultureSPA data recipe: self-generated survey questions, culture-unaware vs culture-aware answers,
the pairs where the two differ become culture training rows (task ``survey``).

    cm-ray synthesize configs/culturespa.yaml      (then: cm-ray train / route / evaluate)

Steps (Xu et al., NAACL 2025): (1) per WVS topic the model writes new survey questions as JSON
``{question, options}`` from few-shot examples (real WVS questions when the evaluation data is
present, else the seed questions below, plus questions it generated in earlier rounds), temperature
0.9, top_p 0.95; exact duplicates, all-numeric option lists whose question defines no scale, and
malformed outputs are dropped, numbered option labels cleaned. (2) each question is answered once
culture-unaware and once per culture culture-aware (temperature 0.6, top_p 0.9, option number
only). (3) a (culture, question) pair is kept when both answers parse and differ; the culture-aware
answer is the label. Every drop is counted by reason in ``synth/summary.json``.

The ``culturespa:`` config section (all optional): questions_per_topic (2), topics (all 13, by name or index),
rounds (2), real_examples (3), generated_examples (2), question_max_new_tokens (160).
"""

from __future__ import annotations

import random
import re
from typing import Any

from cm_ray.artifacts import culture_system_prompt, recipe_file, synth_summary_file
from cm_ray.config import Config
from cm_ray.data.filters import FilterLog
from cm_ray.generation.parsing import extract_json
from cm_ray.recipes.common import llm, recipe_row, write_synth

# The 13 WVS wave-7 topics and their question ranges.
TOPICS = [
    ("Social values, attitudes & stereotypes", 1, 45), ("Happiness & well-being", 46, 56),
    ("Social capital, trust & organizational membership", 57, 105), ("Economic values", 106, 111),
    ("Corruption", 112, 120), ("Migration", 121, 130), ("Security", 131, 151),
    ("Postmaterialist index", 152, 157), ("Science & technology", 158, 163), ("Religious values", 164, 175),
    ("Ethical values & norms", 176, 198), ("Political interest & political participation", 199, 234),
    ("Political culture & political regimes", 235, 259)]
# One seed question per topic, used when the WVS questions are not available.
SEEDS = [
    ("How important is it to you that children learn to be independent?", ["Very important", "Somewhat important", "Not important"]),
    ("All things considered, how satisfied are you with your life these days?", ["Very satisfied", "Rather satisfied", "Rather dissatisfied", "Very dissatisfied"]),
    ("How much do you trust the people in your neighbourhood?", ["Completely", "Somewhat", "Not very much", "Not at all"]),
    ("Should incomes be made more equal, or do we need larger income differences as incentives?", ["Incomes should be more equal", "Somewhere in between", "Larger differences are needed"]),
    ("How common do you think bribe-taking is among local officials?", ["Very common", "Fairly common", "Rare", "Very rare"]),
    ("What effect do immigrants have on the development of this country?", ["Very good", "Quite good", "Neither good nor bad", "Quite bad", "Very bad"]),
    ("How secure do you feel walking alone in your neighbourhood at night?", ["Very secure", "Quite secure", "Not very secure", "Not at all secure"]),
    ("Which should be the country's first aim for the next ten years?", ["Economic growth", "Strong defence forces", "More say for people in their jobs and communities", "Making cities more beautiful"]),
    ("Is the world better off, or worse off, because of science and technology?", ["Much better off", "Somewhat better off", "Somewhat worse off", "Much worse off"]),
    ("Apart from weddings and funerals, how often do you pray?", ["Several times a day", "Once a week", "Only on holy days", "Never"]),
    ("Can it ever be justified to avoid paying a fare on public transport?", ["Never justifiable", "Rarely justifiable", "Sometimes justifiable", "Always justifiable"]),
    ("How interested would you say you are in politics?", ["Very interested", "Somewhat interested", "Not very interested", "Not at all interested"]),
    ("Is having a strong leader who does not bother with parliament a good way of governing this country?", ["Very good", "Fairly good", "Fairly bad", "Very bad"]),
]
QUESTION_SCHEMA = {"type": "object", "properties": {
    "question": {"type": "string", "minLength": 10},
    "options": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2, "maxItems": 10}},
    "required": ["question", "options"], "additionalProperties": False}
_NUMBERED = re.compile(r"^\s*(?:\(?\d{1,2}[.):\-]|\d{1,2}\s+-)\s*")
_SCALE_WORDS = re.compile(r"\bscale\b|\bfrom\s+'?\d+'?\s*(?:\(|meaning|=|to)|\b\d+\s*(?:means|=)", re.I)
UNAWARE = "You are a person with your own values and opinions."


def clean_question(obj: Any) -> tuple[dict | None, str | None]:
    """Validated, cleaned ``{question, options}`` or (None, reason) — CultureSPA's filter."""
    if not isinstance(obj, dict):
        return None, "not_an_object"
    q, opts = obj.get("question"), obj.get("options")
    if not isinstance(q, str) or len(q.strip()) < 10:
        return None, "missing_question"
    if not isinstance(opts, list) or not 2 <= len(opts) <= 10 or not all(isinstance(o, str) for o in opts):
        return None, "bad_options"
    opts = [_NUMBERED.sub("", o).strip() for o in opts]
    if any(not o for o in opts) or len(set(o.lower() for o in opts)) < len(opts):
        return None, "empty_or_repeated_option"
    if any(not re.search(r"\w", o) for o in opts):  # "...", "###": placeholders, not answers
        return None, "option_without_text"
    if all(re.fullmatch(r"[\d\s.,%-]+", o) for o in opts) and not _SCALE_WORDS.search(q):
        return None, "numeric_options_without_scale"
    return {"question": " ".join(q.split()), "options": opts}, None


def seed_questions(cfg: Config) -> dict[int, list[dict]]:
    """Few-shot pool per topic index: real WVS questions when the data is present, else SEEDS."""
    from cm_ray.eval.data import find_data_dir, wvs_available, wvs_questions

    root = find_data_dir(cfg.evaluate.data_dir)
    pool: dict[int, list[dict]] = {i: [] for i in range(len(TOPICS))}
    if wvs_available(root):
        for q in wvs_questions(root):
            num = int(re.sub(r"\D", "", q.qid) or 0)
            for i, (_, lo, hi) in enumerate(TOPICS):
                if lo <= num <= hi:
                    pool[i].append({"question": q.question, "options": q.options})
    for i, (q, opts) in enumerate(SEEDS):
        if not pool[i]:
            pool[i].append({"question": q, "options": opts})
    return pool


def _question_prompt(topic: str, examples: list[dict]) -> list[dict]:
    import json

    shots = "\n".join(json.dumps(e, ensure_ascii=False) for e in examples)
    return [{"role": "system", "content": "You write questions for the World Values Survey."},
            {"role": "user", "content": (
                f"Topic: {topic}.\nExample survey questions as JSON:\n{shots}\n\n"
                "Write one new survey question on this topic, different from the examples, with its "
                "answer options in order. Reply with JSON only: "
                '{"question": "...", "options": ["...", "..."]}')}]


def run_culturespa_data(cfg: Config, store: Any, force: bool = False) -> dict:
    """Stage ``culturespa``: write survey training rows under ``synth/`` and drop counts."""
    from cm_ray.tasks import load_task

    opts = cfg.culturespa
    per_topic = opts.questions_per_topic
    rounds = max(1, opts.rounds)
    n_real, n_gen = opts.real_examples, opts.generated_examples
    wanted = opts.topics
    topic_idx = [i for i, (name, _, _) in enumerate(TOPICS)
                 if wanted is None or i in wanted or name in wanted]
    rng = random.Random(cfg.seed)
    pool = seed_questions(cfg)
    log = FilterLog()
    seen = {e["question"].lower() for p in pool.values() for e in p}
    generated: dict[int, list[dict]] = {i: [] for i in topic_idx}

    # Step 1: question generation, in rounds so later prompts include earlier generated examples.
    for r in range(rounds):
        n_this = per_topic // rounds + (1 if r < per_topic % rounds else 0)
        reqs = []
        for i in topic_idx:
            for _ in range(n_this):
                shots = rng.sample(pool[i], min(n_real, len(pool[i])))
                shots += rng.sample(generated[i], min(n_gen, len(generated[i])))
                reqs.append({"topic": i, "messages": _question_prompt(TOPICS[i][0], shots),
                             "json_schema": QUESTION_SCHEMA})
        outs = llm(cfg, reqs, max_new_tokens=opts.question_max_new_tokens,
                   temperature=0.9, top_p=0.95, seed=cfg.seed + r)
        dropped = []
        for out in outs:
            try:
                q, why = clean_question(extract_json(out["generated_text"], any_value=True))
            except ValueError:
                q, why = None, "not_json"
            if q is None:
                dropped.append(why)
            elif q["question"].lower() in seen:
                dropped.append("duplicate")
            else:
                seen.add(q["question"].lower())
                generated[out["topic"]].append(q)
        log.record("question", len(outs), dropped)
    questions = [q for i in topic_idx for q in generated[i]]

    # Step 2: culture-unaware answer once per question, culture-aware once per (culture, question).
    survey = load_task("survey")

    def ask(system: str, q: dict) -> dict:
        return {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": survey.render_input(q)}],
                "json_schema": {"type": "integer", "minimum": 1, "maximum": len(q["options"])}}

    reqs = [{"q": j, "culture": None, **ask(UNAWARE, q)} for j, q in enumerate(questions)]
    reqs += [{"q": j, "culture": c, **ask(culture_system_prompt(c), q)}
             for c in cfg.cultures for j, q in enumerate(questions)]
    answers = llm(cfg, reqs, max_new_tokens=4, temperature=0.6, top_p=0.9, seed=cfg.seed)

    # Step 3: keep pairs where both parse and differ; the culture-aware answer is the label.
    from cm_ray.eval.data import parse_option_number

    unaware = {a["q"]: parse_option_number(a["generated_text"], len(questions[a["q"]]["options"]))
               for a in answers if a["culture"] is None}
    rows, dropped = [], []
    aware = [a for a in answers if a["culture"] is not None]
    for a in aware:
        q = questions[a["q"]]
        mine = parse_option_number(a["generated_text"], len(q["options"]))
        if unaware[a["q"]] is None:
            dropped.append("unaware_unparseable")
        elif mine is None:
            dropped.append("aware_unparseable")
        elif mine == unaware[a["q"]]:
            dropped.append("answers_agree")
        else:
            sample = {**q, "answer": str(mine + 1)}
            # The culture-naming system prompt lets one joint adapter serve every culture.
            msgs = survey.messages(sample, system=culture_system_prompt(a["culture"]))
            rows.append(recipe_row(cfg, culture=a["culture"], task="survey", sample=sample,
                                   input=survey.render_input(sample), output=survey.render_output(sample),
                                   messages=msgs, label=sample["answer"], engine=a["engine"],
                                   model=a["model"], prompt=a["messages"]))
    log.record("pair", len(aware), dropped)
    counts = write_synth(store, rows, cfg.cultures, cfg.synthesis.validation_fraction)
    summary = {"recipe": "culturespa", "questions_generated": len(questions),
               "question_requests": per_topic * len(topic_idx), "pairs_considered": len(questions) * len(cfg.cultures),
               "rows": len(rows), "rows_per_culture_task": counts, "drops": log.drop_counts()}
    store.write_json(summary, *synth_summary_file())
    store.write_json(questions, *recipe_file("culturespa", "questions.json"))
    summary["headline"] = (f"{len(questions)} questions kept of {per_topic * len(topic_idx)}, "
                           f"{len(rows)} disagreement rows over {len(cfg.cultures)} cultures")
    return summary
